//! Bad input gets the right status code and a message that names the fix,
//! and leaves the daemon serving.

use sandbox_proto::api::{
    upload_request::Part, CreateSandboxRequest, DownloadRequest, ExecRequest, FileType, GetSandboxRequest, Limits,
    StatRequest, UploadHeader, UploadRequest,
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

#[tokio::test(flavor = "multi_thread")]
async fn what_exec_cannot_take_is_refused_at_the_api() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let exec = |argv: &[&str], env: &[(&str, &str)], cwd: &str| ExecRequest {
        sandbox_id: id.clone(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cwd: cwd.to_string(),
        ..Default::default()
    };
    let nul_arg = api.exec_request(exec(&["echo", "a\0b"], &[], "")).await.unwrap_err();
    assert_status(&nul_arg, Code::InvalidArgument, "argv[1] contains a NUL");
    let nul_env = api.exec_request(exec(&["true"], &[("A", "x\0y")], "")).await.unwrap_err();
    assert_status(&nul_env, Code::InvalidArgument, "NUL");
    let bad_name = api.exec_request(exec(&["true"], &[("A=B", "x")], "")).await.unwrap_err();
    assert_status(&bad_name, Code::InvalidArgument, "`=`");
    let relative = api.exec_request(exec(&["true"], &[], "home/user")).await.unwrap_err();
    assert_status(&relative, Code::InvalidArgument, "absolute");
    let create_env = CreateSandboxRequest { env: [("K".to_string(), "\0".to_string())].into(), ..Default::default() };
    assert_status(&api.sandboxes.create(create_env).await.unwrap_err(), Code::InvalidArgument, "NUL");
    let absolute = api.exec_request(exec(&["pwd"], &[], "/tmp")).await.unwrap();
    assert_eq!(absolute.stdout_text(), "/tmp\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_move_only_regular_files() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let download = |path: &str| DownloadRequest { sandbox_id: id.clone(), path: path.into() };
    let zero = api.files.download(download("/dev/zero")).await.unwrap_err();
    assert_status(&zero, Code::FailedPrecondition, "a device");

    api.sh(&id, "mkfifo /tmp/fifo").await;
    // A FIFO nobody writes to would block an open for reading: it is refused at once.
    let fifo = api.files.download(download("/tmp/fifo")).await.unwrap_err();
    assert_status(&fifo, Code::FailedPrecondition, "a FIFO");
    let header = UploadRequest {
        part: Some(Part::Header(UploadHeader { sandbox_id: id.clone(), path: "/tmp/fifo".into(), mode: 0 })),
    };
    let onto_fifo = upload(&mut api, vec![header, UploadRequest { part: Some(Part::Data(b"data".to_vec().into())) }]).await;
    assert_status(&onto_fifo, Code::FailedPrecondition, "a FIFO");
    let kept = api.files.stat(StatRequest { sandbox_id: id.clone(), path: "/tmp/fifo".into() }).await.unwrap().into_inner();
    assert_eq!(kept.r#type, FileType::Other as i32, "the FIFO is left as it was");
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
