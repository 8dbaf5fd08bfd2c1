//! A panic is a bug: it is logged through the log writer and counted
//! (`agiproxy_panics_total`), and the process goes on. Its own test binary:
//! the hook and the subscriber are process-wide.

use agiproxy::logging::{self, LogFormat};

#[test]
fn a_panic_is_counted_and_the_process_goes_on() {
    let _log = logging::init(LogFormat::Json, "info", 100);
    assert_eq!(logging::panics(), 0);
    let joined = std::thread::Builder::new()
        .name("doomed".into())
        .spawn(|| panic!("deliberately, for the test"))
        .unwrap()
        .join();
    assert!(joined.is_err());
    assert_eq!(logging::panics(), 1);
    // A panic in a runtime task too: tokio catches it, the hook counts it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let task = rt.block_on(async { tokio::spawn(async { panic!("in a task") }).await });
    assert!(task.unwrap_err().is_panic());
    assert_eq!(logging::panics(), 2);
}
