//! moto's KMS server (from PyPI) on a loopback port, for keyd's aws-kms tests and benchmark.
//!
//! The server runs through `tests/moto/kms_server.py`, which starts moto's own server (what the
//! `moto_server` command runs) and adds the two things keyd's tests need from a real KMS that
//! moto lacks: keys survive a restart (so a test can stop KMS mid-run and start it again), and
//! disabled keys refuse to decrypt. See that file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use crate::http::{form_encode, request};

const LAUNCHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/moto/kms_server.py");

/// The Python with moto installed: `$TEST_MOTO_PYTHON` (scripts/test.sh sets it when it
/// installs moto into its own virtualenv), else `python3`.
pub fn python() -> String {
    std::env::var("TEST_MOTO_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Whether moto can run here: that Python can import moto's server.
pub fn prerequisite() -> Result<(), String> {
    let out = std::process::Command::new(python())
        .args(["-c", "import moto.server, moto.kms"])
        .output()
        .map_err(|e| format!("{}: {e}", python()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} cannot import moto ({}); pip install 'moto[server]'",
            python(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A moto KMS server; stopped when dropped.
#[derive(Debug)]
pub struct Moto {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Mutex<Option<tokio::process::Child>>,
}

impl Moto {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // A free port: bind, note it, release it for moto.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        std::fs::write(
            dir.path().join("credentials"),
            "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
        )
        .expect("credentials file");
        let m = Self {
            addr,
            dir,
            child: Mutex::new(None),
        };
        m.start_again().await;
        m
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A shared credentials file with moto's test keys (profile `default`).
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL: an outage, not a shutdown). Keys persist for a restart.
    pub async fn stop(&self) {
        let child = self.child.lock().expect("lock").take();
        if let Some(mut c) = child {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub async fn start_again(&self) {
        let log = std::fs::File::create(self.dir.path().join("moto.log")).expect("log");
        let child = tokio::process::Command::new(python())
            .arg(LAUNCHER)
            .args(["--port", &self.addr.port().to_string()])
            .arg("--state")
            .arg(self.dir.path().join("kms-state.json"))
            .args(["--parent-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start moto (python3 tests/moto/kms_server.py)");
        *self.child.lock().expect("lock") = Some(child);
        for _ in 0..200 {
            if request(self.addr, "GET", "/moto-api/data.json", &[], vec![])
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "moto did not start on {}: {}",
            self.addr,
            std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
        );
    }

    /// A KMS API call (`TrentService.<op>`), unsigned (moto checks no signature until IAM
    /// authorization is switched on).
    pub async fn kms(&self, op: &str, body: Value) -> (u16, Value) {
        let target = format!("TrentService.{op}");
        let (status, body) = request(
            self.addr,
            "POST",
            "/",
            &[
                ("x-amz-target", &target),
                ("content-type", "application/x-amz-json-1.1"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0",
                ),
            ],
            body.to_string().into_bytes(),
        )
        .await
        .expect("moto request");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// A new symmetric key; its ARN.
    pub async fn create_key(&self) -> String {
        let (status, v) = self
            .kms("CreateKey", json!({ "Description": "keyd test" }))
            .await;
        assert_eq!(status, 200, "{v}");
        v["KeyMetadata"]["Arn"].as_str().expect("ARN").to_owned()
    }

    /// DisableKey (moto wants the bare key id here).
    pub async fn disable_key(&self, arn: &str) {
        let (status, v) = self
            .kms("DisableKey", json!({ "KeyId": key_id_of(arn) }))
            .await;
        assert_eq!(status, 200, "{v}");
    }

    pub async fn enable_key(&self, arn: &str) {
        let (status, v) = self
            .kms("EnableKey", json!({ "KeyId": key_id_of(arn) }))
            .await;
        assert_eq!(status, 200, "{v}");
    }

    /// Creates an IAM user allowed only `actions` on every key, switches on moto's IAM
    /// authorization (every request from then on must be signed by a known user), and returns
    /// a credentials file for that user. Use a Moto of its own: the test keys stop working.
    pub async fn restricted_credentials(&self, actions: &[&str]) -> PathBuf {
        let policy = json!({
            "Version": "2012-10-17",
            "Statement": [{ "Effect": "Allow", "Action": actions, "Resource": "*" }]
        })
        .to_string();
        self.iam("Action=CreateUser&UserName=keyd&Version=2010-05-08")
            .await;
        self.iam(&format!(
            "Action=PutUserPolicy&UserName=keyd&PolicyName=keyd&PolicyDocument={}&Version=2010-05-08",
            form_encode(&policy)
        ))
        .await;
        let xml = self
            .iam("Action=CreateAccessKey&UserName=keyd&Version=2010-05-08")
            .await;
        let tag = |name: &str| {
            let open = format!("<{name}>");
            let start = xml.find(&open).expect("tag") + open.len();
            let end = xml[start..].find('<').expect("end") + start;
            xml[start..end].to_owned()
        };
        let path = self.dir.path().join("restricted-credentials");
        std::fs::write(
            &path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                tag("AccessKeyId"),
                tag("SecretAccessKey")
            ),
        )
        .expect("credentials");
        let (status, _) = request(
            self.addr,
            "POST",
            "/moto-api/reset-auth",
            &[],
            b"0".to_vec(),
        )
        .await
        .expect("reset-auth");
        assert_eq!(status, 200);
        path
    }

    async fn iam(&self, form: &str) -> String {
        let (status, body) = request(
            self.addr,
            "POST",
            "/",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
                ),
            ],
            form.as_bytes().to_vec(),
        )
        .await
        .expect("moto IAM request");
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "{form}: {text}");
        text
    }
}

/// The key id part of a key ARN (or the argument if it is not an ARN).
pub fn key_id_of(arn: &str) -> &str {
    arn.rsplit_once("key/").map_or(arn, |(_, id)| id)
}
