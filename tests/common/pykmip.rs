//! A real KMIP server for tests: installs PyKMIP's server from PyPI into a venv under target/
//! (once, under a file lock), makes a CA and certificates with the openssl CLI, starts
//! `pykmip-server` with mutual TLS on a free loopback port, and kills it (and the children it
//! forks) on Drop. Keys are created, revoked and destroyed with kmsfs's own KMIP client.
#![allow(dead_code)]

use kmsfs::kms::kmip::{KmipKms, Settings};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const PYKMIP_VERSION: &str = "0.11.0";
/// The client identity that owns the test keys (PyKMIP: the certificate's CN).
pub const OWNER: &str = "fusefs";

/// `pykmip-server` in the venv ($KMSFS_PYKMIP_VENV or target/pykmip-venv), installed if missing.
pub fn server_binary() -> PathBuf {
    let (venv, _lock) = super::test_venv("KMSFS_PYKMIP_VENV", "pykmip-venv");
    let bin = venv.join("bin/pykmip-server");
    if !bin.exists() {
        super::pip_install(&venv, &[&format!("pykmip=={PYKMIP_VERSION}")]);
    }
    assert!(bin.exists(), "pykmip installed no pykmip-server");
    bin
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`NAME-ca.crt`/`.key`) in `dir`; ECDSA P-256 throughout (fast to make, and PyKMIP's
/// TLS 1.2 suite shares a GCM cipher suite with rustls only for an ECDSA server certificate).
pub fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.crt"),
            "-days",
            "30",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `NAME.crt`/`.key` for `cn` signed by CA `ca`, with the given extensions.
pub fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca.crt"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "30",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    let mut perm = std::fs::metadata(dir.join(format!("{name}.key")))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
    std::fs::set_permissions(dir.join(format!("{name}.key")), perm).unwrap();
}

pub const CLIENT_EXT: &str =
    "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Kmip {
    child: Option<Child>,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl Kmip {
    /// A PyKMIP server with mutual TLS, its certificates in its directory: `test-ca.crt`, the
    /// owner's `client.crt`/`.key` (CN fusefs), `intruder.crt`/`.key` (CN intruder, same CA).
    pub fn start() -> Kmip {
        let bin = server_binary();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d, "test");
        make_cert(
            d,
            "test",
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
             keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n",
        );
        make_cert(d, "test", "client", OWNER, CLIENT_EXT);
        make_cert(d, "test", "intruder", "intruder", CLIENT_EXT);
        std::fs::create_dir(d.join("policies")).unwrap();
        let port = free_port();
        let conf = format!(
            "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={p}/server.crt\nkey_path={p}/server.key\n\
             ca_path={p}/test-ca.crt\nauth_suite=TLS1.2\npolicy_path={p}/policies\nenable_tls_client_auth=True\n\
             logging_level=INFO\ndatabase_path={p}/pykmip.db\n",
            p = d.display()
        );
        std::fs::write(d.join("server.conf"), conf).unwrap();
        let out = std::fs::File::create(d.join("server.stdout")).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&bin)
                .arg("-f")
                .arg(d.join("server.conf"))
                .arg("-l")
                .arg(d.join("server.log"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                // Its own process group: Drop kills the children it forks with it.
                .process_group(0)
                .spawn()
                .expect("start pykmip-server")
        };
        let mut k = Kmip {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        // Readiness: the port accepts connections.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(&k.addr).is_err() {
            let exited = k.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "pykmip-server exited: {}", k.log());
            assert!(
                std::time::Instant::now() < deadline,
                "pykmip-server did not listen: {}",
                k.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        k
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}\n{}", read("server.stdout"), read("server.log"))
    }

    /// The mount's environment for the certificate `who` ("client" or "intruder").
    pub fn env_as(&self, who: &str) -> Vec<(String, String)> {
        vec![
            ("KMSFS_KMIP_CA".into(), self.path("test-ca.crt")),
            ("KMSFS_KMIP_CERT".into(), self.path(&format!("{who}.crt"))),
            ("KMSFS_KMIP_KEY".into(), self.path(&format!("{who}.key"))),
        ]
    }

    /// The owner's environment.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_as("client")
    }

    /// A KMIP client as the owner, for key management.
    pub fn admin(&self) -> Admin {
        self.client(KEY_UNUSED)
    }

    /// kmsfs's provider for key `key`, as the owner.
    pub fn client(&self, key: &str) -> Admin {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Settings {
            addrs: vec![self.addr.clone()],
            key: key.into(),
            ca: self.path("test-ca.crt").into(),
            cert: self.path("client.crt").into(),
            client_key: self.path("client.key").into(),
        };
        let kms = KmipKms::connect(s, rt.handle()).expect("a KMIP client");
        Admin { rt, kms }
    }

    /// Stops the server now (SIGKILL to its process group).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kmip {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The key an admin client is made for: it only manages objects by identifier.
const KEY_UNUSED: &str = "unused";

pub struct Admin {
    pub rt: tokio::runtime::Runtime,
    pub kms: Arc<KmipKms>,
}

impl Admin {
    /// A new Active AES-256 key object named `name`; its identifier.
    pub fn create_active(&self, name: &str) -> String {
        let id = self.rt.block_on(self.kms.create_key(name)).expect("create");
        self.rt.block_on(self.kms.activate(&id)).expect("activate");
        id
    }

    pub fn revoke(&self, id: &str, compromised: bool) {
        self.rt
            .block_on(self.kms.revoke(id, compromised))
            .expect("revoke");
    }

    pub fn destroy(&self, id: &str) {
        self.rt.block_on(self.kms.destroy(id)).expect("destroy");
    }
}
