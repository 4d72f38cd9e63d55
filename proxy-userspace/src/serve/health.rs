//! kube-proxy's proxier health (upstream pkg/proxy/healthcheck/proxy_health.go): healthy while
//! no change is queued, or the oldest queued change is younger than the health timeout
//! (kube-proxy: 2 x syncPeriod). `/healthz` is also unhealthy while this node is being deleted
//! (deletionTimestamp set, or the cluster autoscaler's ToBeDeleted taint); `/livez` ignores the
//! node. The bodies are byte for byte kube-proxy's, times in Go's `time.Time.String()` layout,
//! because health checkers of cloud load balancers and people's scripts read them.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Node;

/// Taint the cluster autoscaler puts on a node it is about to delete (upstream
/// `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Default)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
    /// `None` until a node state was reported: eligible while starting, as upstream.
    node_eligible: Option<bool>,
}

/// What `/healthz` and `/livez` answer from. Shared between the sync loop (writer) and the HTTP
/// handlers (readers); every critical section is a few loads and stores.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
}

/// One answer of a health endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub healthy: bool,
    /// HTTP status: 200 or 503.
    pub status: u16,
    /// JSON body, as kube-proxy writes it.
    pub body: String,
}

impl Health {
    /// `timeout`: how long a queued change may stay unapplied (kube-proxy: 2 x syncPeriod).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(State::default()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain timestamps inconsistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change was noticed that the maps do not reflect yet. Only the oldest pending one counts.
    pub fn queued_update(&self) {
        self.queued_update_at(SystemTime::now());
    }

    pub fn queued_update_at(&self, now: SystemTime) {
        let mut s = self.lock();
        if s.oldest_queued.is_none() {
            s.oldest_queued = Some(now);
        }
    }

    /// The maps now say what the source says.
    pub fn updated(&self) {
        self.updated_at(SystemTime::now());
    }

    pub fn updated_at(&self, now: SystemTime) {
        let mut s = self.lock();
        s.oldest_queued = None;
        s.last_updated = Some(now);
    }

    /// When the oldest change not yet applied was noticed.
    pub fn oldest_queued(&self) -> Option<SystemTime> {
        self.lock().oldest_queued
    }

    /// Whether this node may receive traffic: false while it is being deleted. The Kubernetes
    /// API source reports it from this node's Node object (see [`node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = Some(eligible);
    }

    /// Upstream `SyncNode`.
    pub fn sync_node(&self, node: &Node) {
        self.set_node_eligible(node_eligible(node));
    }

    fn proxier_healthy(&self, s: &State, now: SystemTime) -> bool {
        s.oldest_queued.is_none_or(|q| {
            // A clock stepped back makes the change look fresh, never stale.
            now.duration_since(q).unwrap_or_default() < self.timeout
        })
    }

    /// The proxier's own health, ignoring the node (upstream `IsHealthy`).
    pub fn is_healthy(&self) -> bool {
        let s = self.lock();
        self.proxier_healthy(&s, SystemTime::now())
    }

    /// `/healthz` at `now`.
    pub fn healthz_at(&self, now: SystemTime) -> Answer {
        let s = self.lock();
        let eligible = s.node_eligible.unwrap_or(true);
        let healthy = self.proxier_healthy(&s, now) && eligible;
        // Upstream reports "now" as lastUpdated while healthy (older releases said when the sync
        // loop last ran, even with nothing to do).
        let last = if healthy { Some(now) } else { s.last_updated };
        let body = format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}}}"#,
            go_time(last),
            go_time(Some(now)),
        );
        answer(healthy, body)
    }

    /// `/livez` at `now`: as `/healthz` without the node.
    pub fn livez_at(&self, now: SystemTime) -> Answer {
        let s = self.lock();
        let healthy = self.proxier_healthy(&s, now);
        let last = if healthy { Some(now) } else { s.last_updated };
        let body = format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
            go_time(last),
            go_time(Some(now)),
        );
        answer(healthy, body)
    }
}

fn answer(healthy: bool, body: String) -> Answer {
    Answer {
        healthy,
        status: if healthy { 200 } else { 503 },
        body,
    }
}

/// Upstream `SyncNode`: a node is eligible unless it is being deleted or the cluster autoscaler
/// marked it for deletion.
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// `t` in Go's `time.Time.String()` layout in UTC ("2006-01-02 15:04:05.999999999 +0000 UTC",
/// trailing zeros of the fraction dropped), `None` as Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    // Before 1970 only with a broken clock: shown as the epoch.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn go_time_layout() {
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(Some(at(0))), "1970-01-01 00:00:00 +0000 UTC");
        // 2024-02-29 12:34:56.5 UTC
        let t = at(1_709_210_096) + Duration::from_millis(500);
        assert_eq!(go_time(Some(t)), "2024-02-29 12:34:56.5 +0000 UTC");
        let t = at(1_709_210_096) + Duration::from_nanos(123_456_789);
        assert_eq!(go_time(Some(t)), "2024-02-29 12:34:56.123456789 +0000 UTC");
        assert_eq!(
            go_time(Some(at(951_782_400))),
            "2000-02-29 00:00:00 +0000 UTC"
        );
    }

    #[test]
    fn healthy_until_a_queued_change_is_older_than_the_timeout() {
        let h = Health::new(Duration::from_secs(60));
        // Starting up: nothing queued, healthy, lastUpdated is now.
        let a = h.healthz_at(at(100));
        assert_eq!(a.status, 200);
        assert_eq!(
            a.body,
            r#"{"lastUpdated": "1970-01-01 00:01:40 +0000 UTC","currentTime": "1970-01-01 00:01:40 +0000 UTC", "nodeEligible": true}"#
        );
        h.updated_at(at(100));
        h.queued_update_at(at(110));
        // A second change does not move the oldest one.
        h.queued_update_at(at(150));
        assert_eq!(h.healthz_at(at(169)).status, 200);
        assert_eq!(h.livez_at(at(169)).status, 200);
        let a = h.healthz_at(at(170));
        assert_eq!(a.status, 503);
        assert!(!a.healthy);
        // While unhealthy, lastUpdated is the last successful sync.
        assert_eq!(
            a.body,
            r#"{"lastUpdated": "1970-01-01 00:01:40 +0000 UTC","currentTime": "1970-01-01 00:02:50 +0000 UTC", "nodeEligible": true}"#
        );
        assert_eq!(
            h.livez_at(at(170)).body,
            r#"{"lastUpdated": "1970-01-01 00:01:40 +0000 UTC","currentTime": "1970-01-01 00:02:50 +0000 UTC"}"#
        );
        h.updated_at(at(171));
        assert_eq!(h.healthz_at(at(500)).status, 200);
    }

    #[test]
    fn never_synced_reports_go_zero_time() {
        let h = Health::new(Duration::from_secs(60));
        h.queued_update_at(at(0));
        let a = h.livez_at(at(61));
        assert_eq!(a.status, 503);
        assert!(
            a.body
                .starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","#)
        );
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_not_livez() {
        let h = Health::new(Duration::from_secs(60));
        let node: Node = serde_json::from_str(
            r#"{"metadata":{"name":"n","deletionTimestamp":"2024-01-01T00:00:00Z"}}"#,
        )
        .unwrap();
        h.sync_node(&node);
        let a = h.healthz_at(at(5));
        assert_eq!(a.status, 503);
        assert!(a.body.ends_with(r#""nodeEligible": false}"#), "{}", a.body);
        assert_eq!(h.livez_at(at(5)).status, 200);
        assert!(h.is_healthy());

        let tainted: Node = serde_json::from_str(
            r#"{"metadata":{"name":"n"},"spec":{"taints":[{"key":"ToBeDeletedByClusterAutoscaler","effect":"NoSchedule"}]}}"#,
        )
        .unwrap();
        assert!(!node_eligible(&tainted));
        let fine: Node = serde_json::from_str(
            r#"{"metadata":{"name":"n"},"spec":{"taints":[{"key":"other","effect":"NoSchedule"}]}}"#,
        )
        .unwrap();
        h.sync_node(&fine);
        assert_eq!(h.healthz_at(at(5)).status, 200);
    }

    #[test]
    fn a_clock_stepping_back_does_not_make_a_change_stale() {
        let h = Health::new(Duration::from_secs(60));
        h.queued_update_at(at(1000));
        assert_eq!(h.healthz_at(at(10)).status, 200);
    }
}
