//! The double's state: namespaces with their mounts and policies, tokens, and what tests
//! inspect (request counts, plaintexts seen).

use std::collections::{BTreeMap, HashMap};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub struct State {
    pub sealed: bool,
    pub namespaces: HashMap<String, Namespace>,
    pub tokens: HashMap<String, Token>,
    /// The simulated Kubernetes API server's valid ServiceAccount tokens.
    pub sa_tokens: HashMap<String, ()>,
    /// Requests by `METHOD path` (without `/v1/`), for tests that count calls.
    pub requests: BTreeMap<String, u64>,
    /// Every plaintext the transit engine received or returned, so that a test can search
    /// logs for them.
    pub plaintexts: Vec<Vec<u8>>,
    pub next_id: u64,
}

#[derive(Default)]
pub struct Namespace {
    pub transit: HashMap<String, HashMap<String, TransitKey>>,
    pub approle: HashMap<String, HashMap<String, AppRole>>,
    pub kubernetes: HashMap<String, Kubernetes>,
    pub policies: HashMap<String, Vec<Rule>>,
}

pub struct TransitKey {
    pub derived: bool,
    pub versions: Vec<([u8; 32], u64)>,
    pub min_decryption_version: u64,
    pub min_encryption_version: u64,
    pub deletion_allowed: bool,
}

#[derive(Clone)]
pub struct Token {
    pub namespace: String,
    pub policies: Vec<String>,
    pub expires: Option<Instant>,
    pub ttl: u64,
}

pub struct AppRole {
    pub role_id: String,
    pub secret_ids: Vec<String>,
    pub policies: Vec<String>,
    pub ttl: u64,
}

#[derive(Default)]
pub struct Kubernetes {
    pub configured: bool,
    pub issuer: Option<String>,
    pub disable_iss_validation: bool,
    pub roles: HashMap<String, K8sRole>,
}

pub struct K8sRole {
    pub names: Vec<String>,
    pub namespaces: Vec<String>,
    pub policies: Vec<String>,
    pub ttl: u64,
    pub audience: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub path: String,
    pub caps: Vec<String>,
}

pub fn ns_mut<'a>(st: &'a mut State, ns: &str) -> &'a mut Namespace {
    st.namespaces.entry(ns.to_owned()).or_default()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("randomness");
    b
}

pub fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("randomness");
    k
}

pub fn random_hex(n: usize) -> String {
    hex::encode(random_bytes(n))
}

pub fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
