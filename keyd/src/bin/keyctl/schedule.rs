//! `keyctl schedule` and `keyctl rotate`: rotation schedules and bounds per key class.

use std::time::Duration;

use clap::Subcommand;
use keyd_mtls::client::Connection;
use keyd_proto::time::format_duration;
use keyd_proto::{Bounds, ClassSchedule, MaintenanceWindow, ScheduleUpdate};

use crate::http::{call, to_body};
use crate::table::{print, table};
use crate::{EXIT_INVALID, EXIT_NOT_FOUND, Failure, Out, fail};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Show the schedule and bounds of one class, or of all.
    Get {
        class: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Change a schedule; options left out keep their value.
    Set {
        class: String,
        /// Time between rotations, e.g. 7d, 12h.
        #[arg(long)]
        period: Option<String>,
        /// How long the old key stays accepted after the switch, e.g. 5m.
        #[arg(long)]
        overlap: Option<String>,
        /// Maintenance window (UTC) inside which rotations start: "HH-HH" or "mon,wed HH-HH".
        #[arg(long, conflicts_with = "no_window")]
        window: Option<String>,
        /// Remove the maintenance window.
        #[arg(long)]
        no_window: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Stop scheduled rotations of a class (manual `keyctl rotate` still works).
    Pause {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Resume scheduled rotations of a class.
    Resume {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Set compliance bounds on a class's period; schedules outside them are refused.
    Bounds {
        class: String,
        #[arg(long)]
        min: Option<String>,
        #[arg(long)]
        max: Option<String>,
        #[command(flatten)]
        out: Out,
    },
}

pub async fn run(conn: &mut Connection, cmd: ScheduleCommand) -> Result<(), Failure> {
    let (class, update, out) = match cmd {
        ScheduleCommand::Get { class, out } => return get(conn, class.as_deref(), out).await,
        ScheduleCommand::Bounds {
            class,
            min,
            max,
            out,
        } => return bounds(conn, &class, min.as_deref(), max.as_deref(), out).await,
        ScheduleCommand::Set {
            class,
            period,
            overlap,
            window,
            no_window,
            out,
        } => {
            let update = ScheduleUpdate {
                period: period
                    .as_deref()
                    .map(|v| duration("period", v))
                    .transpose()?,
                overlap: overlap
                    .as_deref()
                    .map(|v| duration("overlap", v))
                    .transpose()?,
                window: match (window, no_window) {
                    (Some(w), _) => Some(Some(parse_window(&w)?)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
                paused: None,
            };
            (class, update, out)
        }
        ScheduleCommand::Pause { class, out } => (
            class,
            ScheduleUpdate {
                paused: Some(true),
                ..Default::default()
            },
            out,
        ),
        ScheduleCommand::Resume { class, out } => (
            class,
            ScheduleUpdate {
                paused: Some(false),
                ..Default::default()
            },
            out,
        ),
    };
    put(
        conn,
        &format!("/v1/schedules/{class}"),
        to_body(&update)?,
        out,
    )
    .await
}

/// `keyctl schedule get [CLASS]`.
async fn get(conn: &mut Connection, class: Option<&str>, out: Out) -> Result<(), Failure> {
    let all: Vec<ClassSchedule> = call(conn, "GET", "/v1/schedules", None).await?;
    let shown: Vec<ClassSchedule> = match class {
        Some(c) => {
            let v: Vec<_> = all.into_iter().filter(|s| s.class.as_str() == c).collect();
            if v.is_empty() {
                return Err(fail(
                    EXIT_NOT_FOUND,
                    format!("no key class {c:?} (ipsec, wireguard-node-keys, wireguard-psk, kek)"),
                ));
            }
            v
        }
        None => all,
    };
    print(out.json(), &shown, || schedules_table(&shown));
    Ok(())
}

/// `keyctl schedule bounds CLASS [--min D] [--max D]`.
async fn bounds(
    conn: &mut Connection,
    class: &str,
    min: Option<&str>,
    max: Option<&str>,
    out: Out,
) -> Result<(), Failure> {
    let bounds = Bounds {
        min_period: min.map(|v| duration("min", v)).transpose()?,
        max_period: max.map(|v| duration("max", v)).transpose()?,
    };
    put(
        conn,
        &format!("/v1/schedules/{class}/bounds"),
        to_body(&bounds)?,
        out,
    )
    .await
}

/// PUTs a change and shows the class as keyd now has it.
async fn put(conn: &mut Connection, path: &str, body: Vec<u8>, out: Out) -> Result<(), Failure> {
    let s: ClassSchedule = call(conn, "PUT", path, Some(body)).await?;
    print(out.json(), &s, || schedules_table(std::slice::from_ref(&s)));
    Ok(())
}

/// `keyctl rotate CLASS`: rotate a key class now.
pub async fn rotate(conn: &mut Connection, class: &str, out: Out) -> Result<(), Failure> {
    let v: serde_json::Value = call(conn, "POST", &format!("/v1/rotate/{class}"), None).await?;
    print(out.json(), &v, || {
        format!("{}\n", v["result"].as_str().unwrap_or_default())
    });
    Ok(())
}

fn duration(what: &str, v: &str) -> Result<Duration, Failure> {
    humantime::parse_duration(v).map_err(|e| {
        fail(
            EXIT_INVALID,
            format!("--{what} {v:?}: {e} (e.g. 7d, 12h, 5m)"),
        )
    })
}

/// "HH-HH" or "mon,wed HH-HH".
fn parse_window(spec: &str) -> Result<MaintenanceWindow, Failure> {
    let bad = || {
        fail(
            EXIT_INVALID,
            format!("--window {spec:?}: expected \"HH-HH\" or \"mon,wed HH-HH\" (UTC)"),
        )
    };
    let (days, hours) = match spec.trim().rsplit_once(' ') {
        Some((d, h)) => (
            d.split(',')
                .map(|x| x.trim().to_lowercase())
                .filter(|x| !x.is_empty())
                .collect(),
            h,
        ),
        None => (vec![], spec.trim()),
    };
    let (a, b) = hours.split_once('-').ok_or_else(bad)?;
    let start_hour = a.trim().parse().map_err(|_| bad())?;
    let end_hour = b.trim().parse().map_err(|_| bad())?;
    Ok(MaintenanceWindow {
        days,
        start_hour,
        end_hour,
    })
}
fn schedules_table(all: &[ClassSchedule]) -> String {
    let rows = all
        .iter()
        .map(|c| {
            let d = |d: Option<Duration>| d.map_or("-".into(), |d| format_duration(d).to_string());
            vec![
                c.class.as_str().to_owned(),
                format_duration(c.schedule.period).to_string(),
                format_duration(c.schedule.overlap).to_string(),
                c.schedule.window.as_ref().map_or("-".into(), |w| {
                    let days = if w.days.is_empty() {
                        "daily".to_owned()
                    } else {
                        w.days.join(",")
                    };
                    format!("{days} {:02}-{:02}", w.start_hour, w.end_hour)
                }),
                if c.schedule.paused {
                    "yes".into()
                } else {
                    "no".into()
                },
                d(c.bounds.min_period),
                d(c.bounds.max_period),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "CLASS",
            "PERIOD",
            "OVERLAP",
            "WINDOW (UTC)",
            "PAUSED",
            "MIN",
            "MAX",
        ],
        &rows,
    )
}
