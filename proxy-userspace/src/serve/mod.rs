//! The HTTP servers kube-proxy runs and operators rely on: `/healthz` and `/livez` on the
//! health address (default `0.0.0.0:10256`), Prometheus `/metrics` on the metrics address
//! (default `127.0.0.1:10249`). They run as tasks on vipx's tokio runtime; their state is
//! written by the sync loop (`Telemetry`).

pub mod health;
pub mod metrics;
pub mod service_health;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use tokio::{net::TcpListener, task::JoinHandle};

pub use health::Health;
pub use metrics::{DataPath, Metrics};

/// kube-proxy's ports.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;
pub const DEFAULT_HEALTHZ_BIND: &str = "0.0.0.0:10256";
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:10249";

/// What the servers answer from: written by the sync loop, read by the handlers.
pub struct Telemetry {
    pub health: Health,
    pub metrics: Metrics,
    data_path: Mutex<Option<Arc<dyn DataPath>>>,
}

impl Telemetry {
    /// `health_timeout`: how long a noticed change may stay unapplied before `/healthz` fails
    /// (kube-proxy: 2 x syncPeriod).
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            health: Health::new(health_timeout),
            metrics: Metrics::new(),
            data_path: Mutex::new(None),
        }
    }

    /// Where the `vipx_*` data-path series come from (set once the eBPF object is loaded).
    pub fn set_data_path(&self, dp: Arc<dyn DataPath>) {
        *self
            .data_path
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dp);
    }

    fn data_path(&self) -> Option<Arc<dyn DataPath>> {
        self.data_path
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A change was noticed that the maps do not reflect yet.
    pub fn queued(&self) {
        let now = SystemTime::now();
        self.health.queued_update_at(now);
        self.metrics.queued(now);
    }

    /// A sync succeeded after `took`: the maps say what the source says.
    pub fn synced(&self, took: Duration) {
        let now = SystemTime::now();
        let queued = self.health.oldest_queued();
        self.metrics.synced(now, took, queued);
        self.health.updated_at(now);
    }

    /// The `/metrics` body (blocking: reads the data path's maps).
    pub fn scrape_blocking(&self) -> String {
        let snap = self.data_path().map(|dp| dp.snapshot());
        if let Some(e) = snap.as_ref().and_then(|s| s.error.as_ref()) {
            tracing::warn!("metrics: {e}");
        }
        self.metrics.encode(snap.as_ref())
    }
}

/// A `--healthz-bind-address` / `--metrics-bind-address` value as kube-proxy reads it: empty
/// disables the server, an address without a port gets the default port ("0.0.0.0",
/// "[::]" or "::").
pub fn parse_bind_address(s: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("{s:?} is not an IP address with an optional port"))
}

/// The running servers; stopping them closes their sockets.
pub struct Servers {
    pub healthz: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Stop serving and wait until the sockets are closed (before the pin lock is released, so
    /// the next vipx can bind the same ports).
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long a bind is retried while the address is in use: the vipx this one replaces (a
/// DaemonSet rollout, a restart) may still be closing its sockets.
const BIND_RETRY: Duration = Duration::from_secs(5);

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let started = Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < BIND_RETRY =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("binding the {what} server to {addr} (--{what}-bind-address)")
                });
            }
        }
    }
}

/// Bind both servers (an error if either address cannot be bound) and serve them on the
/// current runtime.
pub async fn start(
    telemetry: Arc<Telemetry>,
    healthz: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<Servers> {
    let mut servers = Servers {
        healthz: None,
        metrics: None,
        tasks: Vec::new(),
    };
    if let Some(addr) = healthz {
        let l = bind(addr, "healthz").await?;
        servers.healthz = Some(l.local_addr()?);
        servers
            .tasks
            .push(spawn(l, health_router(telemetry.clone())));
        tracing::info!(address = %addr, "serving /healthz and /livez");
    }
    if let Some(addr) = metrics {
        let l = bind(addr, "metrics").await?;
        servers.metrics = Some(l.local_addr()?);
        servers.tasks.push(spawn(l, metrics_router(telemetry)));
        tracing::info!(address = %addr, "serving /metrics");
    }
    Ok(servers)
}

fn spawn(listener: TcpListener, router: Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        // axum retries failed accepts itself; serving ends only with the task.
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    })
}

pub fn health_router(t: Arc<Telemetry>) -> Router {
    // Any method, as Go's ServeMux in kube-proxy.
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .with_state(t)
}

pub fn metrics_router(t: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/metrics", any(scrape))
        // kube-proxy's metrics server answers the apiserver-style /healthz too.
        .route("/healthz", any(|| async { "ok" }))
        .with_state(t)
}

fn json(a: &health::Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        a.body.clone(),
    )
        .into_response()
}

async fn healthz(State(t): State<Arc<Telemetry>>) -> Response {
    let a = t.health.healthz_at(SystemTime::now());
    t.metrics.answered(false, a.status);
    json(&a)
}

async fn livez(State(t): State<Arc<Telemetry>>) -> Response {
    let a = t.health.livez_at(SystemTime::now());
    t.metrics.answered(true, a.status);
    json(&a)
}

async fn scrape(State(t): State<Arc<Telemetry>>) -> Response {
    // Map reads are syscalls (a conntrack walk can take a second): off the runtime's thread,
    // so the sync loop keeps running meanwhile.
    match tokio::task::spawn_blocking(move || t.scrape_blocking()).await {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("scrape failed: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    #[test]
    fn bind_addresses_as_kube_proxy_reads_them() {
        let p = |s| parse_bind_address(s, 10256);
        assert_eq!(p(""), Ok(None));
        assert_eq!(p("  "), Ok(None));
        assert_eq!(
            p("0.0.0.0:10256"),
            Ok(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(p("0.0.0.0"), Ok(Some("0.0.0.0:10256".parse().unwrap())));
        assert_eq!(p("127.0.0.1:9"), Ok(Some("127.0.0.1:9".parse().unwrap())));
        assert_eq!(p("::"), Ok(Some("[::]:10256".parse().unwrap())));
        assert_eq!(p("[::]"), Ok(Some("[::]:10256".parse().unwrap())));
        assert_eq!(p("[::1]:1"), Ok(Some("[::1]:1".parse().unwrap())));
        for bad in ["localhost:10256", "0.0.0.0:99999", "1.2.3", ":10256"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    /// A plain HTTP/1.1 GET: status code and body.
    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    struct FakeDataPath;
    impl DataPath for FakeDataPath {
        fn snapshot(&self) -> metrics::DataPathSnapshot {
            metrics::DataPathSnapshot {
                stats: vec![("packets", 7)],
                maps: vec![],
                error: None,
                conntrack_gc: None,
            }
        }
    }

    #[test]
    fn servers_answer_over_http() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Arc::new(Telemetry::new(Duration::from_millis(200)));
        t.set_data_path(Arc::new(FakeDataPath));
        let any = "127.0.0.1:0".parse().ok();
        let servers = rt.block_on(start(t.clone(), any, any)).unwrap();
        let (h, m) = (servers.healthz.unwrap(), servers.metrics.unwrap());
        // The runtime must run for the servers to answer: drive it from another thread.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::spawn(move || {
            rt.block_on(async move {
                let _ = stop_rx.await;
                servers.stop().await;
            });
        });

        let (status, head, body) = get(h, "/healthz");
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["lastUpdated"].is_string() && v["currentTime"].is_string(),
            "{body}"
        );
        assert_eq!(v["nodeEligible"], serde_json::Value::Bool(true));
        let (status, _, body) = get(h, "/livez");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v.get("nodeEligible").is_none(), "{body}");
        assert_eq!(get(h, "/nope").0, 404);

        // A change noticed and not applied within the timeout: both fail.
        t.queued();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(get(h, "/healthz").0, 503);
        assert_eq!(get(h, "/livez").0, 503);
        t.synced(Duration::from_millis(1));
        assert_eq!(get(h, "/healthz").0, 200);
        // The node being deleted fails /healthz only.
        t.health.set_node_eligible(false);
        let (status, _, body) = get(h, "/healthz");
        assert_eq!(status, 503);
        assert!(body.ends_with(r#""nodeEligible": false}"#), "{body}");
        assert_eq!(get(h, "/livez").0, 200);

        let (status, head, body) = get(m, "/metrics");
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 2",
            "vipx_datapath_events_total{reason=\"packets\"} 7",
        ] {
            assert!(body.contains(name), "{name} missing:\n{body}");
        }
        assert_eq!(get(m, "/healthz").2, "ok");

        stop_tx.send(()).unwrap();
        driver.join().unwrap();
        // Stopped: the ports are closed.
        assert!(std::net::TcpStream::connect(h).is_err());
    }

    #[test]
    fn a_port_in_use_is_an_error_at_start() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let t = Arc::new(Telemetry::new(Duration::from_secs(60)));
        // Retried for BIND_RETRY (5 s) in case the previous vipx is still closing it.
        let err = rt
            .block_on(start(t, None, Some(addr)))
            .err()
            .expect("bound a port in use");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--metrics-bind-address") && msg.contains(&addr.to_string()),
            "{msg}"
        );
    }
}
