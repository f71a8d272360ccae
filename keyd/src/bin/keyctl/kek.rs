//! `keyctl kek`: the KEK custodian's status, KEK rotation and migration between custodians.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use keyd::custody::spec::DEFAULT_JWT_FILE;
use keyd_mtls::client::Connection;
use keyd_proto::kek::{
    AwsKmsSpec, KekMigrateRequest, KekRotateRequest, KekSpec, KekStatus, MigrationStatus,
    VaultAuth, VaultTransitSpec,
};

use crate::http::{call, to_body};
use crate::table::{print, table};
use crate::{EXIT_INVALID, EXIT_SERVER, Failure, fail};

#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// The active custodian, its health, retired custodians and the last rotation/migration.
    Status,
    /// A new KEK on the active backend, then every record rewrapped under it in the
    /// background: a new local KEK file, the KMS key given by --key-id, or a new version of
    /// the Vault transit key.
    Rotate {
        /// aws-kms: the new KMS key (ARN recommended).
        #[arg(long)]
        key_id: Option<String>,
        /// vault-transit: do not create a key version, only rewrap to the latest one.
        #[arg(long)]
        rewrap_only: bool,
        /// Wait for the rewrap to complete, printing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Move every record to another custodian (local -> aws-kms, aws-kms -> vault-transit,
    /// ...). keyd checks the new custodian with a wrap and unwrap round trip first. Paths are
    /// read by keyd, on its host.
    Migrate {
        #[arg(long, value_enum)]
        to: Backend,
        #[command(flatten)]
        target: Box<TargetArgs>,
        /// Wait for the rewrap to complete, printing progress.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Local,
    AwsKms,
    VaultTransit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VaultAuthMethod {
    Token,
    Approle,
    Kubernetes,
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// local: the new KEK file (created 0600 if absent).
    #[arg(long)]
    local_path: Option<PathBuf>,
    /// aws-kms: key ARN, key id or alias.
    #[arg(long)]
    key_id: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// aws-kms: endpoint of a KMS-compatible server.
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    profile: Option<String>,
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// vault-transit: e.g. https://vault.example:8200.
    #[arg(long)]
    vault_addr: Option<String>,
    #[arg(long)]
    vault_namespace: Option<String>,
    #[arg(long, default_value = "transit")]
    vault_mount: String,
    #[arg(long)]
    vault_key: Option<String>,
    #[arg(long)]
    vault_ca_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = VaultAuthMethod::Kubernetes)]
    vault_auth: VaultAuthMethod,
    /// Mount of the auth method (default: approle or kubernetes).
    #[arg(long)]
    vault_auth_mount: Option<String>,
    #[arg(long)]
    vault_token_file: Option<PathBuf>,
    #[arg(long)]
    vault_role_id: Option<String>,
    #[arg(long)]
    vault_secret_id_file: Option<PathBuf>,
    #[arg(long)]
    vault_role: Option<String>,
    #[arg(long, default_value = DEFAULT_JWT_FILE)]
    vault_jwt_file: PathBuf,
}

fn need<T>(v: Option<T>, flag: &str, backend: &str) -> Result<T, Failure> {
    v.ok_or_else(|| fail(EXIT_INVALID, format!("--to {backend} needs {flag}")))
}

impl TargetArgs {
    fn spec(self, to: Backend) -> Result<KekSpec, Failure> {
        Ok(match to {
            Backend::Local => KekSpec::Local {
                path: need(self.local_path, "--local-path", "local")?,
            },
            Backend::AwsKms => KekSpec::AwsKms(AwsKmsSpec {
                key_id: need(self.key_id, "--key-id", "aws-kms")?,
                region: self.region,
                endpoint: self.endpoint,
                profile: self.profile,
                credentials_file: self.credentials_file,
                config_file: self.config_file,
            }),
            Backend::VaultTransit => {
                let b = "vault-transit";
                let auth = match self.vault_auth {
                    VaultAuthMethod::Token => VaultAuth::Token {
                        token_file: need(self.vault_token_file, "--vault-token-file", b)?,
                    },
                    VaultAuthMethod::Approle => VaultAuth::Approle {
                        mount: self.vault_auth_mount.unwrap_or_else(|| "approle".into()),
                        role_id: need(self.vault_role_id, "--vault-role-id", b)?,
                        secret_id_file: need(
                            self.vault_secret_id_file,
                            "--vault-secret-id-file",
                            b,
                        )?,
                    },
                    VaultAuthMethod::Kubernetes => VaultAuth::Kubernetes {
                        mount: self.vault_auth_mount.unwrap_or_else(|| "kubernetes".into()),
                        role: need(self.vault_role, "--vault-role", b)?,
                        jwt_file: self.vault_jwt_file,
                    },
                };
                KekSpec::VaultTransit(VaultTransitSpec {
                    address: need(self.vault_addr, "--vault-addr", b)?,
                    namespace: self.vault_namespace,
                    mount: self.vault_mount,
                    key: need(self.vault_key, "--vault-key", b)?,
                    ca_file: self.vault_ca_file,
                    auth,
                })
            }
        })
    }
}

pub async fn run(conn: &mut Connection, json: bool, cmd: KekCommand) -> Result<(), Failure> {
    match cmd {
        KekCommand::Status => {
            let s: KekStatus = call(conn, "GET", "/v1/kek", None).await?;
            print(json, &s, || status_table(&s));
        }
        KekCommand::Rotate {
            key_id,
            rewrap_only,
            wait,
        } => {
            let body = to_body(&KekRotateRequest {
                key_id,
                rewrap_only,
            })?;
            let m: MigrationStatus = call(conn, "POST", "/v1/kek/rotate", Some(body)).await?;
            follow(conn, json, m, wait).await?;
        }
        KekCommand::Migrate { to, target, wait } => {
            let body = to_body(&KekMigrateRequest {
                to: (*target).spec(to)?,
            })?;
            let m: MigrationStatus = call(conn, "POST", "/v1/kek/migrate", Some(body)).await?;
            follow(conn, json, m, wait).await?;
        }
    }
    Ok(())
}

async fn follow(
    conn: &mut Connection,
    json: bool,
    started: MigrationStatus,
    wait: bool,
) -> Result<(), Failure> {
    if !wait {
        print(json, &started, || {
            format!(
                "KEK {} {} started: {} records to rewrap to {}; follow it with `keyctl kek status`\n",
                started.kind, started.id, started.total, started.to
            )
        });
        return Ok(());
    }
    if !json {
        eprintln!(
            "KEK {} {} started: {} records to rewrap to {}",
            started.kind, started.id, started.total, started.to
        );
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s: KekStatus = call(conn, "GET", "/v1/kek", None).await?;
        let Some(m) = s.migration.filter(|m| m.id == started.id) else {
            continue;
        };
        if m.state == "completed" {
            print(json, &m, || migration_line(&m) + "\n");
            if m.failed > 0 {
                return Err(fail(
                    EXIT_SERVER,
                    format!(
                        "{} records could not be rewrapped (they stay under the old KEK): {}",
                        m.failed,
                        m.failures.join("; ")
                    ),
                ));
            }
            return Ok(());
        }
        if !json {
            eprintln!("{}", migration_line(&m));
        }
    }
}

fn migration_line(m: &MigrationStatus) -> String {
    format!(
        "{} {} {}: {}/{} rewrapped, {} failed{}",
        m.kind,
        m.id,
        m.state,
        m.rewrapped,
        m.total,
        m.failed,
        m.last_error
            .as_deref()
            .map(|e| format!(" (waiting: {e})"))
            .unwrap_or_default()
    )
}

fn status_table(s: &KekStatus) -> String {
    let mut rows = vec![
        vec!["custodian".into(), s.spec.clone()],
        vec!["key id".into(), s.key_id.clone()],
        vec!["health".into(), s.health.state.clone()],
    ];
    if let Some(r) = &s.health.reason {
        rows.push(vec!["why".into(), r.clone()]);
    }
    if let Some(t) = s.health.since {
        rows.push(vec!["since".into(), t.to_string()]);
    }
    if let Some(t) = s.health.serving_until {
        rows.push(vec![
            if s.health.serving {
                "serving held keys until"
            } else {
                "stopped serving keys at"
            }
            .into(),
            t.to_string(),
        ]);
    }
    for r in &s.retired {
        rows.push(vec!["retired (still holds records)".into(), r.clone()]);
    }
    if let Some(m) = &s.migration {
        rows.push(vec!["last migration".into(), migration_line(m)]);
    }
    if let Some(n) = &s.config_note {
        rows.push(vec!["note".into(), n.clone()]);
    }
    table(&["FIELD", "VALUE"], &rows)
}
