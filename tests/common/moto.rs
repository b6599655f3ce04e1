//! A server that speaks the AWS KMS wire protocol for tests: moto's server mode (PyPI
//! `moto[server]`, installed into a venv under target/ on first use), started on a free
//! loopback port with **signature checking on**, an admin and a least-privilege mount user
//! made in its IAM, and a symmetric key with alias `alias/kmsfs`. Killed on Drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MOTO_VERSION: &str = "5.2.5";
pub const REGION: &str = "us-east-1";
pub const ALIAS: &str = "alias/kmsfs";

/// What the mount's IAM user may do: the README's policy, without its conditions (moto does
/// not evaluate condition keys).
pub const MOUNT_ACTIONS: &[&str] = &[
    "kms:GenerateDataKey",
    "kms:Decrypt",
    "kms:ReEncrypt*",
    "kms:DescribeKey",
];

/// The venv's python with moto and boto3 (installed if missing; one installer at a time).
pub fn python() -> PathBuf {
    let (venv, _lock) = super::test_venv("KMSFS_MOTO_VENV", "moto-venv");
    let python = venv.join("bin/python");
    let installed = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!("import moto, boto3; assert moto.__version__ == '{MOTO_VERSION}'"),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !installed(&python) {
        super::pip_install(&venv, &[&format!("moto[server]=={MOTO_VERSION}"), "boto3"]);
        assert!(installed(&python), "moto not usable after pip install");
    }
    python
}

/// An access key of a moto IAM user.
#[derive(Clone, Debug)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
}

pub struct Moto {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    python: PathBuf,
    /// May do anything (IAM and KMS administration in tests).
    pub admin: AccessKey,
    /// May do only [`MOUNT_ACTIONS`].
    pub mount: AccessKey,
    /// The ARN of the key `alias/kmsfs` names.
    pub key_arn: String,
}

/// The setup, run with boto3 while moto still accepts anything: two users, one key.
const SETUP: &str = r#"
import boto3, json, sys
url, actions = sys.argv[1], json.loads(sys.argv[2])
kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
def user(name, actions):
    iam.create_user(UserName=name)
    doc = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="kmsfs", PolicyDocument=json.dumps(doc))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return [k["AccessKeyId"], k["SecretAccessKey"]]
admin = user("admin", "*")
mount = user("kmsfs", actions)
kms = boto3.client("kms", **kw)
arn = kms.create_key(Description="kmsfs test key")["KeyMetadata"]["Arn"]
kms.create_alias(AliasName="alias/kmsfs", TargetKeyId=arn)
print(json.dumps({"admin": admin, "mount": mount, "arn": arn}))
"#;

impl Moto {
    /// A server that checks every request's signature.
    pub fn start() -> Moto {
        Self::start_with(true)
    }

    /// With `check_signatures` false, moto accepts any request, signed or not: for STS
    /// AssumeRoleWithWebIdentity, which AWS serves unsigned but moto 5.2.5 answers with a 500
    /// once its signature check is on.
    pub fn start_with(check_signatures: bool) -> Moto {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let child = Command::new(python.with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let url = format!("http://127.0.0.1:{port}");
        // Readiness: the moto API answers once the server listens.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{url}/moto-api/"),
        ]) != "200"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "moto did not start: {}",
                read(&dir)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let actions = serde_json::to_string(MOUNT_ACTIONS).unwrap();
        let out = Command::new(&python)
            .args(["-c", SETUP, &url, &actions])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "moto setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let key = |k: &str| AccessKey {
            id: v[k][0].as_str().unwrap().into(),
            secret: v[k][1].as_str().unwrap().into(),
        };
        let moto = Moto {
            admin: key("admin"),
            mount: key("mount"),
            key_arn: v["arn"].as_str().unwrap().into(),
            child,
            url,
            dir,
            python,
        };
        if !check_signatures {
            return moto;
        }
        // From now on every request must carry a valid SigV4 signature of a known access key.
        let auth = curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: text/plain",
            "--data",
            "0",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            &format!("{}/moto-api/reset-auth", moto.url),
        ]);
        assert_eq!(auth, "200", "turning on moto's signature check");
        moto
    }

    /// The environment a kmsfs process needs to reach this server as `key`.
    pub fn env(&self, key: &AccessKey) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.url.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", key.id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", key.secret.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs `code` with boto3 as the admin, `kms` and `iam` clients ready; returns its stdout.
    pub fn admin(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\nkw = dict(endpoint_url='{}', region_name='{REGION}', aws_access_key_id='{}', \
             aws_secret_access_key='{}')\nkms = boto3.client('kms', **kw)\niam = boto3.client('iam', **kw)\n{code}\n",
            self.url, self.admin.id, self.admin.secret
        );
        let out = Command::new(&self.python).args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "admin {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        read(&self.dir)
    }

    /// Stops the server now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "10"])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}
