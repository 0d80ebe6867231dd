//! Code contexts end to end on the jail backend, through the public API:
//! persistent python (ipykernel), javascript (node) and bash (bash_kernel)
//! kernels in the template image, their results as MIME bundles, errors,
//! streamed output, restarts, deletes and deadlines.

use std::time::Duration;

use sandbox_proto::api::{
    run_code_event::Event, CodeContext, CodeError, CodeResult, ContextLanguage, CreateContextRequest,
    DeleteContextRequest, Limits, ListContextsRequest, RestartContextRequest, RunCodeEnd, RunCodeRequest,
};
use sandboxd_tests::{Clients, Daemon, DaemonOptions, Watchdog};
use tonic::Code;

/// Everything one cell produced, in order.
#[derive(Debug, Default)]
struct Cell {
    stdout: String,
    stderr: String,
    results: Vec<CodeResult>,
    error: Option<CodeError>,
    execution_count: u32,
    end: Option<RunCodeEnd>,
}

impl Cell {
    /// text/plain of the main result.
    fn text(&self) -> Option<&str> {
        self.results.iter().find(|r| r.is_main_result).and_then(|r| r.data.get("text/plain")).map(String::as_str)
    }

    fn error_name(&self) -> &str {
        self.error.as_ref().map_or("", |e| e.name.as_str())
    }
}

async fn sandbox(api: &mut Clients) -> String {
    api.create(Some(Limits { memory_mib: 1536, ..Default::default() })).await
}

async fn context(api: &mut Clients, sandbox: &str, language: ContextLanguage) -> CodeContext {
    let request = CreateContextRequest { sandbox_id: sandbox.into(), language: language as i32, ..Default::default() };
    api.processes.create_context(request).await.expect("CreateContext").into_inner()
}

fn cell(sandbox: &str, context: &str, code: &str) -> RunCodeRequest {
    RunCodeRequest { sandbox_id: sandbox.into(), context_id: context.into(), code: code.into(), ..Default::default() }
}

/// Runs a cell through RunCodeStream and gathers its events.
async fn run(api: &mut Clients, request: RunCodeRequest) -> Cell {
    let mut events = api.processes.run_code_stream(request).await.expect("RunCodeStream").into_inner();
    let mut cell = Cell::default();
    while let Some(event) = events.message().await.expect("a RunCodeStream event") {
        match event.event.expect("an event") {
            Event::Stdout(data) => cell.stdout.push_str(&String::from_utf8_lossy(&data)),
            Event::Stderr(data) => cell.stderr.push_str(&String::from_utf8_lossy(&data)),
            Event::Result(result) => cell.results.push(result),
            Event::Error(error) => cell.error = Some(error),
            Event::ExecutionCount(count) => cell.execution_count = count,
            Event::End(end) => cell.end = Some(end),
        }
    }
    assert!(cell.end.is_some(), "the stream ends with `end`: {cell:?}");
    cell
}

#[tokio::test(flavor = "multi_thread")]
async fn python_context_keeps_state_and_returns_results_errors_and_plots() {
    let _watchdog = Watchdog::arm("python context", Duration::from_secs(240));
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = sandbox(&mut api).await;
    let python = context(&mut api, &id, ContextLanguage::Python).await;
    assert_eq!(python.cwd, "/home/user");

    let first = run(&mut api, cell(&id, &python.id, "x = 41")).await;
    assert!(first.results.is_empty() && first.error.is_none(), "{first:?}");
    let second = run(&mut api, cell(&id, &python.id, "x + 1")).await;
    assert_eq!(second.text(), Some("42"), "{second:?}");
    assert_eq!(second.execution_count, first.execution_count + 1);

    let printed = run(&mut api, cell(&id, &python.id, "import sys\nprint('out', x)\nprint('err', file=sys.stderr)")).await;
    assert_eq!((printed.stdout.as_str(), printed.stderr.as_str()), ("out 41\n", "err\n"));

    let failed = run(&mut api, cell(&id, &python.id, "1/0")).await;
    let error = failed.error.expect("1/0 raises");
    assert_eq!(error.name, "ZeroDivisionError");
    assert_eq!(error.value, "division by zero");
    assert!(error.traceback.contains("ZeroDivisionError") && error.traceback.contains("1/0"), "{}", error.traceback);
    assert!(!error.traceback.contains('\u{1b}'), "no terminal colours: {:?}", error.traceback);

    let rich = run(&mut api, cell(&id, &python.id, "from IPython.display import HTML, Markdown\ndisplay(Markdown('**b**'))\nHTML('<b>x</b>')")).await;
    assert_eq!(rich.results.len(), 2, "{rich:?}");
    assert_eq!(rich.results[0].data.get("text/markdown").map(String::as_str), Some("**b**"));
    assert!(!rich.results[0].is_main_result && rich.results[1].is_main_result);
    assert_eq!(rich.results[1].data.get("text/html").map(String::as_str), Some("<b>x</b>"));

    let plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()";
    let plotted = run(&mut api, cell(&id, &python.id, plot)).await;
    let figure = plotted.results.iter().find(|r| r.data.contains_key("image/png")).unwrap_or_else(|| panic!("a PNG: {plotted:?}"));
    assert!(!figure.is_main_result);
    // base64 of the PNG signature, no `data:` prefix.
    assert!(figure.data["image/png"].starts_with("iVBORw0KGgo"), "{}", &figure.data["image/png"][..32.min(figure.data["image/png"].len())]);

    let returned = run(&mut api, cell(&id, &python.id, "__return__({'x': x, 'ok': True})")).await;
    assert_eq!(returned.end.unwrap().result_json, r#"{"ok":true,"x":41}"#);

    // The unary RunCode with a context gathers the same.
    let unary = api.processes.run_code(cell(&id, &python.id, "print('hi')\nx * 2")).await.unwrap().into_inner();
    assert_eq!(String::from_utf8_lossy(&unary.stdout), "hi\n");
    assert_eq!(unary.results.iter().find(|r| r.is_main_result).unwrap().data["text/plain"], "82");
    assert!(unary.exit.is_none() && unary.execution_count > 0);

    // A per-cell environment holds for that cell only.
    let mut with_env = cell(&id, &python.id, "import os\nos.environ['GREETING']");
    with_env.env.insert("GREETING".into(), "hello".into());
    assert_eq!(run(&mut api, with_env).await.text(), Some("'hello'"));
    let after = run(&mut api, cell(&id, &python.id, "os.environ.get('GREETING')")).await;
    assert!(after.results.is_empty(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_streamed_while_the_cell_runs() {
    let _watchdog = Watchdog::arm("streamed output", Duration::from_secs(180));
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = sandbox(&mut api).await;
    let python = context(&mut api, &id, ContextLanguage::Python).await;
    // The cell prints, then waits for a file that the test writes only
    // once it has seen the first line: only a streamed line can get there.
    let code = "import os, time\nprint('first', flush=True)\nwhile not os.path.exists('/tmp/go'):\n    time.sleep(0.05)\nprint('second')";
    let mut events = api.processes.run_code_stream(cell(&id, &python.id, code)).await.unwrap().into_inner();
    let mut seen = String::new();
    while !seen.contains("first") {
        match events.message().await.unwrap().expect("more events").event.unwrap() {
            Event::Stdout(data) => seen.push_str(&String::from_utf8_lossy(&data)),
            Event::End(end) => panic!("the cell ended before it could: {end:?}"),
            _ => {}
        }
    }
    api.sh(&id, "touch /tmp/go").await;
    let mut ended = false;
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            Event::Stdout(data) => seen.push_str(&String::from_utf8_lossy(&data)),
            Event::End(_) => ended = true,
            _ => {}
        }
    }
    assert!(ended);
    assert_eq!(seen, "first\nsecond\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_and_bash_contexts_keep_their_state() {
    let _watchdog = Watchdog::arm("javascript and bash contexts", Duration::from_secs(180));
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = sandbox(&mut api).await;

    let js = context(&mut api, &id, ContextLanguage::Javascript).await;
    run(&mut api, cell(&id, &js.id, "let n = 41; const os = require('os');")).await;
    let next = run(&mut api, cell(&id, &js.id, "console.log('hostname', os.hostname()); n + 1")).await;
    assert_eq!(next.text(), Some("42"), "{next:?}");
    assert_eq!(next.stdout, "hostname sandbox\n");
    let awaited = run(&mut api, cell(&id, &js.id, "let n = await Promise.resolve(7); ({ n, list: [1, 2] })")).await;
    let value = awaited.results.iter().find(|r| r.is_main_result).unwrap_or_else(|| panic!("{awaited:?}"));
    assert_eq!(value.data.get("application/json").map(String::as_str), Some(r#"{"n":7,"list":[1,2]}"#));
    let thrown = run(&mut api, cell(&id, &js.id, "null.field")).await;
    assert_eq!(thrown.error_name(), "TypeError", "{thrown:?}");
    let returned = run(&mut api, cell(&id, &js.id, "__return__({ n })")).await;
    assert_eq!(returned.end.unwrap().result_json, r#"{"n":7}"#);

    let bash = context(&mut api, &id, ContextLanguage::Bash).await;
    run(&mut api, cell(&id, &bash.id, "mkdir -p /tmp/work && cd /tmp/work && export COLOUR=blue")).await;
    let kept = run(&mut api, cell(&id, &bash.id, "pwd; echo \"$COLOUR\"")).await;
    assert_eq!(kept.stdout.replace('\r', ""), "/tmp/work\nblue\n", "{kept:?}");
    let failed = run(&mut api, cell(&id, &bash.id, "false")).await;
    assert!(failed.error.is_some(), "a failing command is the cell's error: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn contexts_are_apart_restart_clears_and_delete_frees() {
    let _watchdog = Watchdog::arm("context lifecycle", Duration::from_secs(240));
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = sandbox(&mut api).await;
    let a = context(&mut api, &id, ContextLanguage::Python).await;
    let b = context(&mut api, &id, ContextLanguage::Python).await;
    assert_ne!(a.id, b.id);
    run(&mut api, cell(&id, &a.id, "secret = 'only in a'")).await;
    assert_eq!(run(&mut api, cell(&id, &b.id, "secret")).await.error_name(), "NameError");
    assert_eq!(run(&mut api, cell(&id, &a.id, "secret")).await.text(), Some("'only in a'"));

    let listed = api.processes.list_contexts(ListContextsRequest { sandbox_id: id.clone() }).await.unwrap().into_inner();
    let mut ids: Vec<_> = listed.contexts.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    let mut expected = [a.id.as_str(), b.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);

    let restarted = api
        .processes
        .restart_context(RestartContextRequest { sandbox_id: id.clone(), context_id: a.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((restarted.id.as_str(), restarted.execution_count), (a.id.as_str(), 0));
    let cleared = run(&mut api, cell(&id, &a.id, "secret")).await;
    assert_eq!(cleared.error_name(), "NameError", "{cleared:?}");
    assert_eq!(cleared.execution_count, 1);

    // Kernel processes (their drivers' arguments name the module, not `-m` before it).
    let kernels = "ps -eo args | grep -c -- '-m [i]pykernel_launcher -f' || true";
    assert_eq!(api.sh(&id, kernels).await.trim(), "2");
    api.processes.delete_context(DeleteContextRequest { sandbox_id: id.clone(), context_id: a.id.clone() }).await.unwrap();
    let gone = api.processes.run_code_stream(cell(&id, &a.id, "1")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let again = api.processes.delete_context(DeleteContextRequest { sandbox_id: id.clone(), context_id: a.id.clone() }).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    let listed = api.processes.list_contexts(ListContextsRequest { sandbox_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(listed.contexts.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [b.id.as_str()]);
    // Its kernel is gone (the kill is immediate; give ps a moment to see it).
    let mut left = String::new();
    for _ in 0..50 {
        left = api.sh(&id, kernels).await.trim().to_string();
        if left == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, "1", "one python kernel is left");

    // Bad requests are refused with the cause.
    let unknown = CreateContextRequest { sandbox_id: id.clone(), ..Default::default() };
    assert_eq!(api.processes.create_context(unknown).await.unwrap_err().code(), Code::InvalidArgument);
    let relative = CreateContextRequest { sandbox_id: id.clone(), language: ContextLanguage::Python as i32, cwd: "work".into(), ..Default::default() };
    assert_eq!(api.processes.create_context(relative).await.unwrap_err().code(), Code::InvalidArgument);
    let bad_id = api.processes.run_code_stream(cell(&id, "../../x", "1")).await.unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    let other_key_daemon = api.processes.list_contexts(ListContextsRequest { sandbox_id: "sb-none".into() }).await;
    assert_eq!(other_key_daemon.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_cell_is_interrupted_at_its_deadline_and_the_context_lives_on() {
    let _watchdog = Watchdog::arm("runaway cells", Duration::from_secs(240));
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = sandbox(&mut api).await;
    let python = context(&mut api, &id, ContextLanguage::Python).await;
    run(&mut api, cell(&id, &python.id, "kept = 'still here'")).await;

    let spin = RunCodeRequest { timeout_ms: 1500, ..cell(&id, &python.id, "while True:\n    pass") };
    let interrupted = run(&mut api, spin).await;
    let end = interrupted.end.as_ref().unwrap();
    assert!(end.timed_out && !end.context_restarted, "{interrupted:?}");
    assert_eq!(interrupted.error_name(), "KeyboardInterrupt");
    assert_eq!(run(&mut api, cell(&id, &python.id, "kept")).await.text(), Some("'still here'"));

    // A cell that ignores the interrupt: the kernel is started again.
    let deaf = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass";
    let restarted = run(&mut api, RunCodeRequest { timeout_ms: 1500, ..cell(&id, &python.id, deaf) }).await;
    let end = restarted.end.as_ref().unwrap();
    assert!(end.timed_out && end.context_restarted, "{restarted:?}");
    assert_eq!(run(&mut api, cell(&id, &python.id, "1 + 1")).await.text(), Some("2"));

    let js = context(&mut api, &id, ContextLanguage::Javascript).await;
    run(&mut api, cell(&id, &js.id, "let kept = 'js state'")).await;
    let spun = run(&mut api, RunCodeRequest { timeout_ms: 1500, ..cell(&id, &js.id, "while (true) {}") }).await;
    assert!(spun.end.as_ref().unwrap().timed_out, "{spun:?}");
    assert_eq!(run(&mut api, cell(&id, &js.id, "kept")).await.text(), Some("'js state'"));
}
