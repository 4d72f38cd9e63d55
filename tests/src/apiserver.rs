//! An in-process Kubernetes API server for tests: plain HTTP, serving Services, EndpointSlices
//! and Nodes the way kube-rs watchers read them, so vipx's production client path runs unchanged
//! against it through an ordinary kubeconfig.
//!
//! - list: `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (and the namespaced forms of the first two) with `labelSelector` (`k`, `!k`, `k=v`, `k==v`,
//!   `k!=v`), `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit` / `continue`
//!   pages, and the list's `resourceVersion`;
//! - watch (`?watch=true`): newline-delimited JSON events (ADDED, MODIFIED, DELETED, BOOKMARK
//!   with `allowWatchBookmarks`) from `resourceVersion` on, history replayed first; an object that
//!   stops (starts) matching the selectors is DELETED (ADDED), as the real server does; a watch
//!   from before the compacted history gets an ERROR event with a 410 "too old resource version"
//!   Status; `timeoutSeconds` ends it;
//! - control (methods, for tests): create/update/delete objects (each bumps one global
//!   resourceVersion), bookmarks, drop every watch, compact the history (watches from before it
//!   get 410, forcing a relist), cap page sizes, stop and restart on the same port (the store
//!   survives, as etcd would).
//!
//! The server runs on a thread of its own (optionally inside a network namespace, so a vipx in a
//! lab node reaches it at 127.0.0.1) with a current-thread runtime; stopping drops the runtime,
//! which closes every connection at once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    http::{StatusCode, Uri, header},
    response::{IntoResponse as _, Response},
};
use futures::{StreamExt as _, stream};
use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot, watch};

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Resource::Nodes
    }

    /// The resource and namespace a request path names, if it names one.
    fn parse_path(path: &str) -> Option<(Resource, Option<String>)> {
        let path = path.trim_end_matches('/');
        let (prefix, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
            ("core", rest)
        } else if let Some(rest) = path.strip_prefix("/apis/discovery.k8s.io/v1/") {
            ("discovery", rest)
        } else {
            return None;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (ns, plural) = match parts.as_slice() {
            [plural] => (None, *plural),
            ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural),
            _ => return None,
        };
        let r = match (prefix, plural) {
            ("core", "services") => Resource::Services,
            ("core", "nodes") if ns.is_none() => Resource::Nodes,
            ("discovery", "endpointslices") => Resource::EndpointSlices,
            _ => return None,
        };
        Some((r, ns))
    }
}

type Key = (Resource, String, String);

/// One change in the history: the object before (if any) and after (`None`: deleted).
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Clone, Debug)]
enum Live {
    Change(Arc<Change>),
    Bookmark(u64),
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    live: broadcast::Sender<Live>,
    /// Bumped to end every open watch.
    drops: watch::Sender<u64>,
    /// Pages hold at most this many items, whatever `limit` asks (a server may return fewer).
    max_page: Option<usize>,
    /// Every request served, as `path?query`, for assertions.
    requests: Vec<String>,
    /// Kinds whose requests fail with 500 (an API server that cannot serve them).
    failing: std::collections::BTreeSet<Resource>,
}

/// A running (or stopped) in-process API server. Dropping it stops it and removes its
/// kubeconfig.
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    addr: SocketAddr,
    netns: Option<String>,
    running: Option<Running>,
    dir: PathBuf,
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panicking test thread must not take the server down with a poisoned lock.
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 (a free port) in this network namespace.
    pub fn start() -> Result<Self> {
        Self::start_in(None)
    }

    /// Starts a server on 127.0.0.1 (a free port) inside network namespace `netns` (a name
    /// under /run/netns), reachable from processes in it, such as vipx in a lab node.
    pub fn start_in(netns: Option<&str>) -> Result<Self> {
        let (live, _) = broadcast::channel(65_536);
        let (drops, _) = watch::channel(0);
        let store = Arc::new(Mutex::new(Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            oldest: 0,
            live,
            drops,
            max_page: None,
            requests: Vec::new(),
            failing: std::collections::BTreeSet::new(),
        }));
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vipx-apiserver-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = Self {
            store,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            netns: netns.map(str::to_owned),
            running: None,
            dir,
        };
        server.restart()?;
        let port = server.addr.port();
        std::fs::write(
            server.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
                 server: http://127.0.0.1:{port}\ncontexts:\n- name: test\n  context:\n    \
                 cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  \
                 user: {{}}\n"
            ),
        )?;
        Ok(server)
    }

    /// A kubeconfig naming this server (`http://127.0.0.1:PORT`, no credentials).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: the listener and every connection (open watches included) close at once.
    /// The objects and history stay for [`ApiServer::restart`].
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }

    /// Serves again on the same port (the first start picks a free one).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let store = Arc::clone(&self.store);
        let addr = self.addr;
        let netns = self.netns.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let bound = (|| -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener)> {
                    if let Some(ns) = &netns {
                        enter_netns(ns)?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let listener = rt.block_on(async {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        // The previous run's connections may linger in TIME_WAIT.
                        socket.set_reuseaddr(true)?;
                        socket.bind(addr)?;
                        socket.listen(128)
                    })?;
                    Ok((rt, listener))
                })();
                let (rt, listener) = match bound {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
                let app = Router::new().fallback(handle).with_state(store);
                rt.block_on(async move {
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                eprintln!("apiserver: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: clients see them close.
                rt.shutdown_background();
            })
            .context("spawning the API server thread")?;
        let addr = ready_rx
            .recv()
            .context("the API server thread ended before binding")??;
        self.addr = addr;
        self.running = Some(Running {
            stop: stop_tx,
            thread,
        });
        Ok(())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.store).rv
    }

    /// Creates or replaces an object (a Service, EndpointSlice or Node, as JSON); returns the
    /// resourceVersion it got.
    pub fn apply(&self, resource: Resource, mut object: Value) -> Result<u64> {
        let (ns, name) = {
            let meta = object.get("metadata").context("an object needs metadata")?;
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .context("an object needs metadata.name")?
                .to_owned();
            let ns = if resource.namespaced() {
                meta.get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_owned()
            } else {
                String::new()
            };
            (ns, name)
        };
        let mut s = lock(&self.store);
        s.rv += 1;
        let rv = s.rv;
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if resource.namespaced() {
            object["metadata"]["namespace"] = json!(ns);
        }
        let key = (resource, ns, name);
        let old = s.objects.insert(key, object.clone());
        s.record(Change {
            rv,
            resource,
            old,
            new: Some(object),
        });
        Ok(rv)
    }

    /// [`ApiServer::apply`] of a typed object.
    pub fn apply_typed<T: serde::Serialize>(&self, resource: Resource, object: &T) -> Result<u64> {
        self.apply(resource, serde_json::to_value(object)?)
    }

    /// Deletes an object (namespace ignored for Nodes); false when there was none.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let ns = if resource.namespaced() { namespace } else { "" };
        let mut s = lock(&self.store);
        let Some(mut old) = s
            .objects
            .remove(&(resource, ns.to_owned(), name.to_owned()))
        else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        // A DELETED event carries the object at its deletion resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.record(Change {
            rv,
            resource,
            old: Some(old.clone()),
            new: None,
        });
        true
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allowed them.
    pub fn bookmark(&self) {
        let s = lock(&self.store);
        let _ = s.live.send(Live::Bookmark(s.rv));
    }

    /// Ends every open watch (the connections stay up): clients watch again from where they were.
    pub fn drop_watches(&self) {
        lock(&self.store).drops.send_modify(|n| *n += 1);
    }

    /// Compacts the history: every watch from a resourceVersion before now gets 410 Gone, and
    /// every open watch is ended, so watchers must relist.
    pub fn compact(&self) {
        let mut s = lock(&self.store);
        s.rv += 1;
        s.oldest = s.rv;
        s.history.clear();
        s.drops.send_modify(|n| *n += 1);
    }

    /// Caps every list page at `n` items (`None`: as `limit` asks).
    pub fn set_max_page(&self, n: Option<usize>) {
        lock(&self.store).max_page = n;
    }

    /// Every request served so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.store).requests.clone()
    }

    /// Makes every list and watch of `resource` fail with 500 Internal Server Error (`false`:
    /// serve it again).
    pub fn fail(&self, resource: Resource, failing: bool) {
        let mut s = lock(&self.store);
        if failing {
            s.failing.insert(resource);
        } else {
            s.failing.remove(&resource);
        }
    }

    /// The objects of a kind held now.
    pub fn objects(&self, resource: Resource) -> Vec<Value> {
        lock(&self.store)
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Number of objects of a kind held.
    pub fn count(&self, resource: Resource) -> usize {
        lock(&self.store)
            .objects
            .keys()
            .filter(|k| k.0 == resource)
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Store {
    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(Arc::clone(&change));
        let _ = self.live.send(Live::Change(change));
    }
}

fn enter_netns(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let path = crate::netns::netns_path(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: an open descriptor of a network namespace; only this thread switches.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

/// A label selector term.
#[derive(Debug)]
enum Term {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

/// The selectors of one request.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<Term>,
    /// (field path, value, equal?)
    fields: Vec<(String, String, bool)>,
    namespace: Option<String>,
}

impl Selector {
    fn parse(params: &HashMap<String, String>, namespace: Option<String>) -> Result<Self, String> {
        let mut sel = Selector {
            namespace,
            ..Selector::default()
        };
        for term in params
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let t = if let Some((k, v)) = term.split_once("!=") {
                Term::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else if term.contains(' ') {
                return Err(format!("unsupported label selector term {term:?}"));
            } else {
                Term::Exists(term.into())
            };
            sel.labels.push(t);
        }
        for term in params
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, v, true)
            } else {
                return Err(format!("bad field selector term {term:?}"));
            };
            if !matches!(k, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {k}"));
            }
            sel.fields.push((k.into(), v.into(), eq));
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|t| match t {
            Term::Exists(k) => label(k).is_some(),
            Term::NotExists(k) => label(k).is_none(),
            Term::Eq(k, v) => label(k) == Some(v),
            Term::NotEq(k, v) => label(k) != Some(v),
        });
        let fields_ok = self.fields.iter().all(|(k, v, eq)| {
            let got = match k.as_str() {
                "metadata.name" => meta["name"].as_str(),
                _ => meta["namespace"].as_str(),
            };
            (got == Some(v.as_str())) == *eq
        });
        labels_ok && fields_ok
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error_response(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        status(code, reason, message).to_string(),
    )
        .into_response()
}

async fn handle(
    State(store): State<Arc<Mutex<Store>>>,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    lock(&store).requests.push(
        uri.path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
    );
    let Some((resource, ns)) = Resource::parse_path(uri.path()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if lock(&store).failing.contains(&resource) {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "failing on purpose (test)",
        );
    }
    let selector = match Selector::parse(&params, ns) {
        Ok(s) => s,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch_response(&store, resource, selector, &params)
    } else {
        list_response(&store, resource, &selector, &params)
    }
}

fn list_response(
    store: &Mutex<Store>,
    resource: Resource,
    selector: &Selector,
    params: &HashMap<String, String>,
) -> Response {
    let s = lock(store);
    // A continue token is "<list resourceVersion>/<last key's namespace>/<last key's name>".
    let (list_rv, after) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let (Some(rv), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return error_response(StatusCode::BAD_REQUEST, "BadRequest", "bad continue token");
            };
            let Ok(rv) = rv.parse::<u64>() else {
                return error_response(StatusCode::BAD_REQUEST, "BadRequest", "bad continue token");
            };
            if rv < s.oldest {
                return error_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            }
            (rv, Some((ns.to_owned(), name.to_owned())))
        }
        None => (s.rv, None),
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let limit = match (limit, s.max_page) {
        (Some(l), Some(m)) => Some(l.min(m)),
        (l, m) => l.or(m),
    };
    let mut items = Vec::new();
    let mut more = false;
    for ((r, ns, name), obj) in &s.objects {
        if *r != resource
            || after
                .as_ref()
                .is_some_and(|(ans, aname)| (ns, name) <= (ans, aname))
            || !selector.matches(obj)
        {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            break;
        }
        items.push(obj.clone());
    }
    let mut next = None;
    // The token names the last item returned.
    if more && let Some(last) = items.last() {
        let meta = &last["metadata"];
        next = Some(format!(
            "{list_rv}/{}/{}",
            meta["namespace"].as_str().unwrap_or_default(),
            meta["name"].as_str().unwrap_or_default()
        ));
    }
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if let Some(next) = next {
        metadata["continue"] = json!(next);
    }
    let body = json!({
        "apiVersion": resource.api_version(),
        "kind": format!("{}List", resource.kind()),
        "metadata": metadata,
        "items": items,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The watch event a change is for a watcher with `selector`, if any.
fn event_for(change: &Change, selector: &Selector) -> Option<Value> {
    let was = change.old.as_ref().is_some_and(|o| selector.matches(o));
    let is = change.new.as_ref().is_some_and(|o| selector.matches(o));
    let (kind, obj) = match (was, is, &change.new) {
        (false, true, Some(new)) => ("ADDED", new.clone()),
        (true, true, Some(new)) => ("MODIFIED", new.clone()),
        (true, false, Some(new)) => {
            // No longer selected: gone for this watcher.
            ("DELETED", new.clone())
        }
        (true, _, None) => ("DELETED", change.old.clone()?),
        _ => return None,
    };
    Some(json!({ "type": kind, "object": obj }))
}

fn bookmark_event(resource: Resource, rv: u64) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "apiVersion": resource.api_version(),
            "kind": resource.kind(),
            "metadata": { "resourceVersion": rv.to_string() },
        },
    })
}

fn line(v: &Value) -> Result<String, std::convert::Infallible> {
    Ok(format!("{v}\n"))
}

fn watch_response(
    store: &Mutex<Store>,
    resource: Resource,
    selector: Selector,
    params: &HashMap<String, String>,
) -> Response {
    let s = lock(store);
    let from = params
        .get("resourceVersion")
        .and_then(|rv| rv.parse::<u64>().ok())
        .filter(|rv| *rv > 0);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let ok = |body: Body| {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    let first: Vec<Value> = match from {
        Some(rv) if rv < s.oldest => {
            let gone = json!({
                "type": "ERROR",
                "object": status(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", s.oldest),
                ),
            });
            return ok(Body::from_stream(stream::iter([line(&gone)])));
        }
        Some(rv) => s
            .history
            .iter()
            .filter(|c| c.resource == resource && c.rv > rv)
            .filter_map(|c| event_for(c, &selector))
            .collect(),
        // No resourceVersion: every current object as ADDED, then changes.
        None => s
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == resource && selector.matches(o))
            .map(|(_, o)| json!({ "type": "ADDED", "object": o }))
            .collect(),
    };
    let live = tokio_stream_from(s.live.subscribe());
    let mut drops = s.drops.subscribe();
    drop(s);
    let ended = async move {
        tokio::select! {
            _ = drops.changed() => {}
            () = tokio::time::sleep(timeout) => {}
        }
    };
    let live = live.filter_map(move |l| {
        let ev = match l {
            Live::Change(c) if c.resource == resource => event_for(&c, &selector),
            Live::Change(_) => None,
            Live::Bookmark(rv) => bookmarks.then(|| bookmark_event(resource, rv)),
        };
        std::future::ready(ev)
    });
    let events = stream::iter(first).chain(live).map(|v| line(&v));
    ok(Body::from_stream(events.take_until(ended)))
}

/// The broadcast receiver as a stream; a watcher that lags behind ends (its client watches again
/// from its last resourceVersion and gets the history replayed).
fn tokio_stream_from(rx: broadcast::Receiver<Live>) -> impl futures::Stream<Item = Live> {
    stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(l) => Some((l, rx)),
            Err(_) => None,
        }
    })
}

/// Waits until `pred` holds, polling every 10 ms, for at most `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut pred: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !pred() {
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
