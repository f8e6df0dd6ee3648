//! Throwaway Redis servers for tests: one server ([`RedisServer`]) or a
//! three-master Redis Cluster ([`RedisCluster`]), each on free local ports,
//! with no persistence, in a temporary directory, killed on drop.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/redis_server.rs"]
//! mod redis_server;
//! use redis_server::{RedisCluster, RedisServer};
//! ```
//!
//! It needs `redis-server` (and `redis-cli` for the cluster) on PATH
//! (`scripts/redis.sh` installs them); without them it panics with
//! "redis-server not found: run scripts/redis.sh", so a test that needs Redis
//! fails loudly instead of being skipped. It depends on nothing but std and
//! the `tempfile` dev-dependency (it talks RESP over a `TcpStream` itself).
//!
//! Not every test file uses every item, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NOT_FOUND: &str = "redis-server not found: run scripts/redis.sh";
/// How long a server may take to answer PING (and a cluster to be ok).
const START_WAIT: Duration = Duration::from_secs(5);

/// Panics with the install hint unless `program` runs.
fn require(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if program == "redis-server" {
            panic!("{NOT_FOUND}");
        }
        panic!("{program} not found (it comes with redis-server): run scripts/redis.sh");
    }
}

/// A port that was free a moment ago (the OS picks it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port `p` such that `p` and `p + 10000` (a cluster node's bus port) are
/// both free right now.
fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        if p < 55535 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair (p, p + 10000) for a cluster node");
}

/// Sends one command (RESP array of bulk strings) to 127.0.0.1:`port` and
/// returns the reply: simple strings, integers and bulk strings as their
/// bytes, `-ERR …` as `Err`, nil as empty. Arrays are not supported.
pub fn command(port: u16, args: &[&str]) -> std::io::Result<Vec<u8>> {
    let err = std::io::Error::other;
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    s.write_all(&req)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'+') | Some(b':') => Ok(line.as_bytes()[1..].to_vec()),
        Some(b'-') => Err(err(line[1..].to_string())),
        Some(b'$') => {
            let n: i64 = line[1..]
                .parse()
                .map_err(|_| err(format!("bad reply {line}")))?;
            if n < 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n as usize);
            Ok(buf)
        }
        _ => Err(err(format!("unexpected reply {line:?}"))),
    }
}

/// Polls `ok` every 20 ms until it is true or `START_WAIT` passes.
fn wait_until(mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `redis-server` on `port` with `extra` arguments, logging to
/// `dir/redis-PORT.log`, and waits until it answers PING (or NOAUTH).
fn spawn_server(port: u16, dir: &Path, extra: &[&str]) -> Child {
    let log = dir.join(format!("redis-{port}.log"));
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!("{NOT_FOUND}");
            }
            panic!("spawning redis-server: {e}")
        });
    let up = wait_until(|| {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("redis-server on port {port} exited with {status}; its log:\n{log}");
        }
        match command(port, &["PING"]) {
            Ok(reply) => reply == b"PONG",
            // Up, but started with --requirepass.
            Err(e) => e.to_string().starts_with("NOAUTH"),
        }
    });
    if !up {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("redis-server on port {port} did not answer PING within {START_WAIT:?}; its log:\n{log}");
    }
    child
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One `redis-server` on a free local port.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments
    /// (e.g. `["--requirepass", "secret"]`), used again by `restart`.
    pub fn start_with_args(args: &[&str]) -> RedisServer {
        require("redis-server");
        let dir = tempfile::Builder::new()
            .prefix("cachegen-redis-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut server = RedisServer {
            port,
            dir,
            args,
            child: None,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server and waits for it to exit (its data is lost). The
    /// port is remembered for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again (empty) on the same port; stops it first if
    /// it is running.
    pub fn restart(&mut self) {
        self.stop();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Some(spawn_server(self.port, self.dir.path(), &args));
    }

    /// Sends one command to the server (see [`command`]).
    pub fn command(&self, args: &[&str]) -> std::io::Result<Vec<u8>> {
        command(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of masters only (no replicas) on free local ports.
pub struct RedisCluster {
    ports: Vec<u16>,
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3) cluster-enabled servers, joins them with
    /// `redis-cli --cluster create` (all 16384 slots spread over them) and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        require("redis-server");
        require("redis-cli");
        let dir = tempfile::Builder::new()
            .prefix("cachegen-redis-cluster-")
            .tempdir()
            .unwrap();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < masters {
            let p = free_cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut cluster = RedisCluster {
            ports: ports.clone(),
            dir,
            children: Vec::new(),
        };
        for &p in &ports {
            let conf = format!("nodes-{p}.conf");
            let child = spawn_server(
                p,
                cluster.dir.path(),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "5000",
                ],
            );
            cluster.children.push(Some(child));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running redis-cli --cluster create: {e}"));
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ok = wait_until(|| {
            ports.iter().all(|&p| {
                command(p, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| String::from_utf8_lossy(&info).contains("cluster_state:ok"))
            })
        });
        if !ok {
            let info = command(ports[0], &["CLUSTER", "INFO"]);
            panic!("the cluster did not reach cluster_state:ok within {START_WAIT:?}: {info:?}");
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` (every master as a seed).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends one command to the node on `port` (see [`command`]).
    pub fn command(&self, port: u16, args: &[&str]) -> std::io::Result<Vec<u8>> {
        command(port, args)
    }

    /// The nodes' log files.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.ports
            .iter()
            .map(|p| self.dir.path().join(format!("redis-{p}.log")))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            kill(c);
        }
    }
}
