//! The demo's own FastAGI simulators: a scripted backend and a simulated
//! Asterisk caller. Deliberately small and separate from the test harness
//! (`chaos-tests`), which keeps its own, stricter model of Asterisk: the
//! product never links its tests, and a bug shared by both would hide.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A FastAGI backend on loopback that answers every call with the same
/// commands, one at a time (each after Asterisk's reply), then closes.
pub struct ScriptedBackend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedBackend {
    pub async fn start(commands: Vec<String>) -> std::io::Result<ScriptedBackend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, commands.clone()));
            }
        });
        Ok(ScriptedBackend { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, commands: Vec<String>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    // The header, up to its blank line.
    loop {
        match lines.next_line().await {
            Ok(Some(l)) if !l.is_empty() => continue,
            Ok(Some(_)) => break,
            _ => return,
        }
    }
    for cmd in commands {
        if w.write_all(format!("{cmd}\n").as_bytes()).await.is_err() {
            return;
        }
        // Asterisk's reply; a HANGUP on the way is not one.
        loop {
            match lines.next_line().await {
                Ok(Some(l)) if l == "HANGUP" => continue,
                Ok(Some(_)) => break,
                _ => return,
            }
        }
    }
    let _ = w.shutdown().await;
    // Read until Asterisk closes (its end-of-session HANGUP), as a polite
    // FastAGI server does.
    while let Ok(Some(_)) = lines.next_line().await {}
}

/// An address on loopback where nothing listens (a port just released).
pub fn refused_addr() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

/// What one simulated call saw.
pub struct CallOutcome {
    /// The commands that reached "Asterisk", in order.
    pub commands: Vec<String>,
    /// `AGISTATUS` as Asterisk would set it.
    pub status: &'static str,
    /// `AGIPROXY_ERROR`, when agiproxy set it.
    pub error: Option<String>,
}

/// Places one call the way Asterisk does: connect, send the header, answer
/// each command `200 result=0`; a `failure` line ends it with FAILURE, a
/// close with SUCCESS; `HANGUP` is sent at the end of every session.
pub async fn call(
    proxy: SocketAddr,
    script: &str,
    args: &[&str],
    uniqueid: &str,
) -> std::io::Result<CallOutcome> {
    let stream = TcpStream::connect(proxy).await?;
    let (r, mut w) = stream.into_split();
    w.write_all(header(proxy, script, args, uniqueid).as_bytes())
        .await?;
    let mut lines = BufReader::new(r).lines();
    let mut out = CallOutcome {
        commands: Vec::new(),
        status: "SUCCESS",
        error: None,
    };
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await? {
            if line.to_ascii_lowercase().starts_with("failure") {
                out.commands.push(line);
                out.status = "FAILURE";
                break;
            }
            if let Some(rest) = line.strip_prefix("SET VARIABLE AGIPROXY_ERROR ") {
                out.error = Some(rest.trim_matches('"').to_string());
            }
            out.commands.push(line);
            w.write_all(b"200 result=0\n").await?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if read.is_err() {
        out.status = "(no answer within 10 s)";
    }
    let _ = w.write_all(b"HANGUP\n").await;
    let _ = w.shutdown().await;
    Ok(out)
}

/// A header shaped like Asterisk 23's (see chaos-tests/fixtures).
fn header(proxy: SocketAddr, script: &str, args: &[&str], uniqueid: &str) -> String {
    let mut h = String::from("agi_network: yes\n");
    if !script.is_empty() {
        h += &format!("agi_network_script: {script}\n");
    }
    h += &format!("agi_request: agi://{proxy}/{script}\n");
    for (name, value) in [
        ("agi_channel", "Local/s@demo-00000001;2"),
        ("agi_language", "en"),
        ("agi_type", "Local"),
        ("agi_uniqueid", uniqueid),
        ("agi_version", "23.4.1"),
        ("agi_callerid", "unknown"),
        ("agi_calleridname", "unknown"),
        ("agi_callingpres", "67"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", "demo"),
        ("agi_extension", "s"),
        ("agi_priority", "2"),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "1"),
    ] {
        h += &format!("{name}: {value}\n");
    }
    for (i, a) in args.iter().enumerate() {
        h += &format!("agi_arg_{}: {a}\n", i + 1);
    }
    h + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated caller reads FAILURE the way Asterisk does, and a
    /// plain close as SUCCESS.
    #[tokio::test]
    async fn a_call_to_the_scripted_backend_sees_its_commands() {
        let b = ScriptedBackend::start(vec!["ANSWER".into(), "NOOP".into()])
            .await
            .unwrap();
        let out = call(b.addr(), "x", &[], "1.1").await.unwrap();
        assert_eq!(out.commands, ["ANSWER", "NOOP"]);
        assert_eq!(out.status, "SUCCESS");
    }
}
