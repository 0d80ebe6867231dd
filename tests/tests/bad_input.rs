//! Bad input gets the right status code and a message that names the fix,
//! and leaves the daemon serving.

use sandbox_proto::api::{
    upload_request::Part, CreateSandboxRequest, ExecRequest, GetSandboxRequest, Limits, StatRequest,
    UploadHeader, UploadRequest,
};
use sandboxd_tests::{Daemon, DaemonOptions};
use tonic::Code;

fn assert_status(status: &tonic::Status, code: Code, hint: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(hint), "message {:?} should mention {hint:?}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_precise_errors() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;

    let unknown = api.sandboxes.get(GetSandboxRequest { id: "sb-nope".into() }).await.unwrap_err();
    assert_status(&unknown, Code::NotFound, "List");
    let unknown_exec = api.exec("sb-nope", &["true"]).await.unwrap_err();
    assert_status(&unknown_exec, Code::NotFound, "sb-nope");
    let no_id = api.exec("", &["true"]).await.unwrap_err();
    assert_status(&no_id, Code::InvalidArgument, "sandbox_id");
    let template = api.sandboxes.create(CreateSandboxRequest { template: "gpu".into(), ..Default::default() }).await.unwrap_err();
    assert_status(&template, Code::NotFound, "default");
    let limits = api
        .sandboxes
        .create(CreateSandboxRequest { limits: Some(Limits { memory_mib: 1 << 30, ..Default::default() }), ..Default::default() })
        .await
        .unwrap_err();
    assert_status(&limits, Code::InvalidArgument, "memory_mib");

    let id = api.create(None).await;
    let empty_argv = api.exec(&id, &[]).await.unwrap_err();
    assert_status(&empty_argv, Code::InvalidArgument, "argv");
    let relative = api.files.stat(StatRequest { sandbox_id: id.clone(), path: "etc/passwd".into() }).await.unwrap_err();
    assert_status(&relative, Code::InvalidArgument, "absolute");

    let data_first = upload(&mut api, vec![UploadRequest { part: Some(Part::Data(b"x".to_vec().into())) }]).await;
    assert_status(&data_first, Code::InvalidArgument, "header");
    let header = |path: &str| UploadRequest {
        part: Some(Part::Header(UploadHeader { sandbox_id: id.clone(), path: path.into(), mode: 0 })),
    };
    let two_headers = upload(&mut api, vec![header("/tmp/a"), header("/tmp/a")]).await;
    assert_status(&two_headers, Code::InvalidArgument, "header");
    let oversized = upload(&mut api, vec![header("/tmp/big"), UploadRequest { part: Some(Part::Data(vec![0u8; 2 << 20].into())) }]).await;
    assert_status(&oversized, Code::ResourceExhausted, "1 MiB");
    let huge_stdin = api
        .exec_request(ExecRequest { sandbox_id: id.clone(), argv: vec!["cat".into()], stdin: vec![b'x'; 6 << 20].into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_status(&huge_stdin, Code::ResourceExhausted, "Files.Upload");
    for path in ["/tmp/a", "/tmp/big"] {
        let status = api.files.stat(StatRequest { sandbox_id: id.clone(), path: path.into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "a rejected upload leaves no file at {path}");
    }
    assert_eq!(api.sh(&id, "echo still serving").await, "still serving\n");
}

async fn upload(api: &mut sandboxd_tests::Clients, messages: Vec<UploadRequest>) -> tonic::Status {
    let (tx, rx) = tokio::sync::mpsc::channel(messages.len() + 1);
    for message in messages {
        tx.send(message).await.unwrap();
    }
    drop(tx);
    api.files.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err()
}
