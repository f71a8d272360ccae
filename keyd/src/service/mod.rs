//! keyd's core: the operations the API exposes, over the store and the key custodian.
//!
//! Every change is one [`Txn`]: the sealed records, the state document it updates (guarded by
//! compare-and-swap on its previous bytes) and the audit events describing it commit together or
//! not at all. The in-memory [`Cache`] holds only what can be rebuilt from the store (unsealed
//! keys, the node table, rendered bundles); it is refreshed from the store after each commit.
//! A replicated backend will additionally need a store watch to refresh it on other replicas.

mod audit_ops;
mod claims;
mod dataplane;
mod evidence;
mod ipsec;
mod kek;
mod nodes;
mod poll;
mod rules;
mod rules_view;
mod schedules;
mod state;
mod status;

pub use audit_ops::{Export, ExportRange, Segment};
pub use claims::check_allocation;
pub use dataplane::validate_report;
pub use evidence::{Progress, ReportRequest, SignedReport};
pub use kek::{migrate_kek, rotate_kek};
pub use nodes::{bundle_content, check_registration};
pub use rules_view::RenderedRules;
pub use schedules::updated_schedule;
pub use state::{
    ClaimCheck, Keyd, NodeDirectory, NodeFacts, RemovedNode, RenderedBundle, ServiceConfig,
    ServiceError, StoredSchedules,
};
