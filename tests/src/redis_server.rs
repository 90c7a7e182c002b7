//! A private `redis-server` on a free loopback port, for tests and benches
//! of the shared cache tier. Never the system's service: each one is started
//! here, holds nothing on disk, and is killed when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh `redis-server` may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts one on a free port. `None`, with a message, when
    /// `redis-server` is not installed, except under CI (`CI=true`), where
    /// that is a failure: CI installs it.
    pub fn start() -> Option<Self> {
        if !installed() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed: `.ci/run` (through assets/setup.sh) installs it"
            );
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        Some(Self::start_on(free_port()))
    }

    /// Starts one on `port`: an empty Redis where an earlier one ran.
    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .args(["--loglevel", "warning"])
            // The largest value this project stores is a 4 MiB piece; keep
            // the server's default limits otherwise.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let mut server = RedisServer { child, port };
        server.wait_until_ready();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends one command and returns the first line of the reply, for tests
    /// that look inside (`DBSIZE`) or damage a value (`SETRANGE`).
    pub fn command(&self, args: &[&[u8]]) -> String {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout set");
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).expect("command sent");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("reply read");
        line.trim_end().to_owned()
    }

    /// Stops it at once, as a crash would.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_until_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "redis-server exited at start ({status}); is port {} taken?",
                    self.port
                );
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
                && self.command(&[b"PING"]) == "+PONG"
            {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "redis-server did not answer within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A loopback TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
