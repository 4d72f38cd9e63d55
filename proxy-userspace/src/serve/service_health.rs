//! kube-proxy's service health server: every LoadBalancer Service with externalTrafficPolicy
//! Local has a `healthCheckNodePort`, which cloud load balancers probe on every node to send
//! traffic only to nodes with a local endpoint. Each such port answers any request with
//! kube-proxy's JSON: 200 while the node has local endpoints for the Service and the last sync
//! succeeded, else 503 (`X-Load-Balancing-Endpoint-Weight`: the count). It listens on every
//! address (kube-proxy binds the `--nodeport-addresses` ones).
//!
//! The listeners follow the translated state at every sync: a port is opened when its Service
//! appears, answers the current count, and closes when the Service goes or changes port.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use tokio::task::JoinHandle;

use crate::{desired::HealthCheck, sync::ObjKey};

/// What one port answers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    local_endpoints: usize,
    /// The last sync succeeded: the maps say what the count says (kube-proxy answers 503 while
    /// it is unhealthy).
    proxy_healthy: bool,
}

struct Port {
    answer: Arc<Mutex<Answer>>,
    task: JoinHandle<()>,
}

/// The open health check ports.
#[derive(Default)]
pub struct ServiceHealth {
    ports: BTreeMap<u16, Port>,
    /// Ports that could not be opened, said once each.
    refused: BTreeSet<u16>,
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for p in self.ports.values() {
            p.task.abort();
        }
    }
}

impl ServiceHealth {
    /// Open, update and close ports to match `checks`; `healthy`: the last sync programmed them.
    /// Must run inside the tokio runtime.
    pub fn sync(&mut self, checks: &BTreeMap<ObjKey, HealthCheck>, healthy: bool) {
        let mut wanted: BTreeMap<u16, Answer> = BTreeMap::new();
        for ((namespace, name), hc) in checks {
            // Two Services claiming one port: the first keeps it (the API server refuses this).
            wanted.entry(hc.port).or_insert_with(|| Answer {
                namespace: namespace.clone(),
                name: name.clone(),
                local_endpoints: hc.local_endpoints,
                proxy_healthy: healthy,
            });
        }
        self.ports.retain(|port, p| {
            let keep = wanted.contains_key(port);
            if !keep {
                p.task.abort();
                tracing::info!(port, "health check node port closed");
            }
            keep
        });
        self.refused.retain(|port| wanted.contains_key(port));
        for (port, answer) in wanted {
            if let Some(p) = self.ports.get(&port) {
                *p.answer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = answer;
                continue;
            }
            match open(port, answer) {
                Ok(p) => {
                    tracing::info!(port, "health check node port open");
                    self.refused.remove(&port);
                    self.ports.insert(port, p);
                }
                Err(e) => {
                    if self.refused.insert(port) {
                        tracing::warn!(
                            port,
                            "health check node port not served (retried at every sync): {e}"
                        );
                    }
                }
            }
        }
    }

    /// Open ports (tests).
    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }
}

fn open(port: u16, answer: Answer) -> std::io::Result<Port> {
    // On every address, as kube-proxy (its --nodeport-addresses does not apply to these).
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let answer = Arc::new(Mutex::new(answer));
    let router = Router::new()
        .fallback(any(respond))
        .with_state(answer.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(port, "health check node port stopped: {e}");
        }
    });
    Ok(Port { answer, task })
}

async fn respond(State(answer): State<Arc<Mutex<Answer>>>) -> Response {
    let a = answer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let status = if a.local_endpoints > 0 && a.proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": a.namespace, "name": a.name},
        "localEndpoints": a.local_endpoints,
        "serviceProxyHealthy": a.proxy_healthy,
    })
    .to_string();
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&a.local_endpoints.to_string()) {
        h.insert("X-Load-Balancing-Endpoint-Weight", v);
    }
    r
}
