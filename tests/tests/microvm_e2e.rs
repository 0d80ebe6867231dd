//! The full Linux-guest suite on the microvm backend: boot to the agent's
//! hello over vsock, exec, a PTY, files and shutdown. It needs a host with
//! hardware virtualization (VT-x/AMD-V; on PVM hosts guest ring 0 is
//! emulated and Linux cannot boot), so it runs only with SANDBOXD_E2E_KVM=1,
//! SANDBOXD_KERNEL_DIR (kernel-config/build.sh) and SANDBOXD_GUEST_IMAGE_DIR
//! (scripts/guest-image.sh). See README.md, "Linux guests".

use sandbox_proto::api::{
    connect_request::Input, exec_event::Event, upload_request::Part, ConnectRequest, ConnectStart, DeleteSandboxRequest,
    DownloadRequest, ExecRequest, PtySize, UploadHeader, UploadRequest,
};
use sandboxd_tests::{Daemon, DaemonOptions};

fn microvm_options() -> Option<DaemonOptions> {
    if std::env::var("SANDBOXD_E2E_KVM").as_deref() != Ok("1") {
        eprintln!("skipped: set SANDBOXD_E2E_KVM=1 on a host with VT-x/AMD-V (see README.md, Linux guests)");
        return None;
    }
    let kernel = std::env::var("SANDBOXD_KERNEL_DIR").expect("SANDBOXD_KERNEL_DIR (kernel-config/build.sh)");
    let image = std::env::var("SANDBOXD_GUEST_IMAGE_DIR").expect("SANDBOXD_GUEST_IMAGE_DIR (scripts/guest-image.sh)");
    Some(DaemonOptions {
        backend: "microvm",
        pool_size: 0,
        extra_args: vec![
            "--kernel".into(),
            format!("{kernel}/vmlinux"),
            "--rootfs-image".into(),
            format!("{image}/rootfs.ext4"),
        ],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn linux_guest_boots_to_the_agent_and_serves_the_api() {
    let Some(options) = microvm_options() else { return };
    let daemon = Daemon::start(options).await;
    let mut api = daemon.clients(None).await;
    let booting = std::time::Instant::now();
    let id = api.create(None).await;
    eprintln!("microVM Create (boot to the agent's hello over vsock): {:?}", booting.elapsed());
    let sandbox = api.sandboxes.get(sandbox_proto::api::GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(sandbox.backend, "microvm");

    let output = api.exec(&id, &["sh", "-c", "echo out; echo err >&2; uname -r; exit 3"]).await.unwrap();
    assert!(output.stdout_text().starts_with("out\n6.12"), "{}", output.stdout_text());
    assert_eq!((output.stderr_text().as_str(), output.code()), ("err\n", Some(3)));

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let start = ConnectStart {
        process: Some(ExecRequest { sandbox_id: id.clone(), argv: vec!["sh".into()], ..Default::default() }),
        pty: Some(PtySize { rows: 30, cols: 90 }),
    };
    tx.send(ConnectRequest { input: Some(Input::Start(start)) }).await.unwrap();
    tx.send(ConnectRequest { input: Some(Input::Stdin(b"stty size; exit\n".to_vec().into())) }).await.unwrap();
    let mut events = api.processes.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut screen = String::new();
    while let Some(event) = events.message().await.unwrap() {
        if let Some(Event::Stdout(data)) = event.event {
            screen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(screen.contains("30 90"), "{screen}");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadRequest { part: Some(Part::Header(UploadHeader { sandbox_id: id.clone(), path: "/home/user/f".into(), mode: 0 })) }).await.unwrap();
    tx.send(UploadRequest { part: Some(Part::Data(b"in a microVM".to_vec().into())) }).await.unwrap();
    drop(tx);
    api.files.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
    let mut chunks = api.files.download(DownloadRequest { sandbox_id: id.clone(), path: "/home/user/f".into() }).await.unwrap().into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        data.extend_from_slice(&chunk.data);
    }
    assert_eq!(data, b"in a microVM");
    api.sandboxes.delete(DeleteSandboxRequest { id }).await.unwrap();
}
