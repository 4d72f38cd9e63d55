//! Reads cluster objects from the Kubernetes API server, as kube-proxy does: list-then-watch of
//! Services (without `service.kubernetes.io/service-proxy-name` and
//! `service.kubernetes.io/headless`), EndpointSlices (with `kubernetes.io/service-name`) and this
//! node's Node, through kube-rs watchers (bookmarks, exponential backoff on errors, a full relist
//! after 410 Gone).
//!
//! [`watch`] turns the three watchers into one stream of [`Update`]s; [`KubeState::apply`] feeds
//! them to the same [`ChangeTracker`] the manifests source feeds, object by object. A relist
//! (every watcher's `Init` .. `InitDone`) replaces that kind's objects as a whole, so an object
//! deleted while the watch was down disappears. Nothing is ready to program until all three
//! finished their first list ([`KubeState::ready`]).

use std::path::Path;

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt as _, stream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::digest::{ServiceDigest, SliceDigest};
use crate::sync::{ChangeTracker, ObjKey};

/// kube-proxy's Service selector: Services another proxy owns, and headless ones, are not
/// listed at all.
pub const SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Slices that name their Service, with kube-proxy's exclusions (its one informer factory
/// applies the Service selector to slices too): headless and other proxies' slices are never
/// listed, stored or synced for.
pub const SLICE_SELECTOR: &str = "kubernetes.io/service-name,!service.kubernetes.io/service-proxy-name,\
     !service.kubernetes.io/headless";

/// A client for `kubeconfig` (a file), or the in-cluster service account when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::incluster()
            .context("no --kubeconfig, no KUBECONFIG and no in-cluster service account")?,
    };
    Client::try_from(config).context("building the API client")
}

/// Which watcher an [`Update`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    Slices,
    Node,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Services => "Services",
            Kind::Slices => "EndpointSlices",
            Kind::Node => "Node",
        })
    }
}

/// One step of one watcher.
#[derive(Debug)]
pub enum Update {
    // Boxed: the objects are large and the variants unequal.
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    /// The watcher failed (API unreachable, watch refused, 410 Gone) and retries with backoff;
    /// what is held stays.
    Error(Kind, String),
}

/// The three watchers as one stream. Errors are items (the watchers go on after a backoff), so
/// the stream ends only when dropped.
pub fn watch(client: Client, node_name: &str) -> impl Stream<Item = Update> + Send + 'static {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_SELECTOR),
    )
    .default_backoff()
    .map(|r| match r {
        Ok(e) => Update::Service(Box::new(e)),
        Err(e) => Update::Error(Kind::Services, e.to_string()),
    });
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SLICE_SELECTOR),
    )
    .default_backoff()
    .map(|r| match r {
        Ok(e) => Update::Slice(Box::new(e)),
        Err(e) => Update::Error(Kind::Slices, e.to_string()),
    });
    let node = watcher(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .map(|r| match r {
        Ok(e) => Update::Node(Box::new(e)),
        Err(e) => Update::Error(Kind::Node, e.to_string()),
    });
    stream::select_all([services.boxed(), slices.boxed(), node.boxed()])
}

/// Keeps only the metadata translation reads (name, namespace, labels): managedFields,
/// annotations and the rest are dropped on arrival. Dropping `resourceVersion` also makes an
/// update that changed nothing translation sees compare equal, so it costs no re-translation.
fn strip(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        ..ObjectMeta::default()
    };
}

fn key(meta: &ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One kind's list state.
#[derive(Debug)]
struct Listing<K> {
    /// Objects of a relist under way (`Init` seen, `InitDone` not yet).
    buffer: Option<Vec<K>>,
    /// Whether a list of this kind completed once.
    listed: bool,
    /// The watcher's last error, until it delivers again.
    error: Option<String>,
}

impl<K> Default for Listing<K> {
    fn default() -> Self {
        Self {
            buffer: None,
            listed: false,
            error: None,
        }
    }
}

/// What [`KubeState::apply`] did with an update.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing for the tracker (a relist page buffered, an error recorded).
    Nothing,
    /// The tracker may hold changes.
    Changed,
    /// A relist completed and replaced one kind: the maps should be reconciled as a whole.
    Relisted(Kind),
}

/// The API source's side of the tracker: relists under way, which kinds were listed, errors.
#[derive(Debug, Default)]
pub struct KubeState {
    services: Listing<(ObjKey, ServiceDigest)>,
    slices: Listing<(ObjKey, SliceDigest)>,
    node: Listing<Node>,
}

impl KubeState {
    /// Whether every watcher finished its first list: before that nothing may be programmed
    /// (an empty list would read as "no Services" and delete what a previous vipx left).
    pub fn ready(&self) -> bool {
        self.services.listed && self.slices.listed && self.node.listed
    }

    /// The watchers' current errors (a watcher that failed and has not delivered since).
    pub fn errors(&self) -> Vec<String> {
        [
            (Kind::Services, &self.services.error),
            (Kind::Slices, &self.slices.error),
            (Kind::Node, &self.node.error),
        ]
        .into_iter()
        .filter_map(|(k, e)| e.as_ref().map(|e| format!("{k}: {e}")))
        .collect()
    }

    /// Whether every watcher delivers (none failed since its last event).
    pub fn connected(&self) -> bool {
        self.services.error.is_none() && self.slices.error.is_none() && self.node.error.is_none()
    }

    /// Feeds one update to `tracker`.
    pub fn apply(&mut self, update: Update, tracker: &mut ChangeTracker) -> Applied {
        match update {
            Update::Service(e) => match step(
                &mut self.services,
                *e,
                |s| strip(&mut s.metadata),
                |s| (key(&s.metadata), ServiceDigest::of(s)),
            ) {
                Step::Nothing => Applied::Nothing,
                Step::Replace(all) => {
                    tracker.replace_services_digested(all);
                    Applied::Relisted(Kind::Services)
                }
                Step::Upsert(s) => {
                    tracker.upsert_service(s);
                    Applied::Changed
                }
                Step::Delete(s) => {
                    tracker.delete_service(&key(&s.metadata));
                    Applied::Changed
                }
            },
            Update::Slice(e) => match step(
                &mut self.slices,
                *e,
                |s| strip(&mut s.metadata),
                |s| (key(&s.metadata), SliceDigest::of(s)),
            ) {
                Step::Nothing => Applied::Nothing,
                Step::Replace(all) => {
                    tracker.replace_slices_digested(all);
                    Applied::Relisted(Kind::Slices)
                }
                Step::Upsert(s) => {
                    tracker.upsert_slice(s);
                    Applied::Changed
                }
                Step::Delete(s) => {
                    tracker.delete_slice(&key(&s.metadata));
                    Applied::Changed
                }
            },
            Update::Node(e) => {
                let prepare = |n: &mut Node| {
                    strip(&mut n.metadata);
                    // Only the labels (the zone) are read; spec and status are large.
                    n.spec = None;
                    n.status = None;
                };
                match step(&mut self.node, *e, prepare, std::convert::identity) {
                    Step::Nothing => Applied::Nothing,
                    Step::Replace(all) => {
                        tracker.set_nodes(&all);
                        Applied::Relisted(Kind::Node)
                    }
                    Step::Upsert(n) => {
                        tracker.set_nodes(std::slice::from_ref(&n));
                        Applied::Changed
                    }
                    Step::Delete(_) => {
                        tracker.set_nodes(&[]);
                        Applied::Changed
                    }
                }
            }
            Update::Error(kind, e) => {
                let slot = match kind {
                    Kind::Services => &mut self.services.error,
                    Kind::Slices => &mut self.slices.error,
                    Kind::Node => &mut self.node.error,
                };
                *slot = Some(e);
                Applied::Nothing
            }
        }
    }
}

/// What one watcher event asks of the tracker (`B`: what a relist buffers of each object).
enum Step<K, B> {
    Nothing,
    /// A relist completed: these are all the objects of the kind.
    Replace(Vec<B>),
    Upsert(K),
    Delete(K),
}

/// One watcher event: `Init` starts a buffer, `InitApply` fills it (with `buffered` of the
/// object: a digest, so that a relist of 10,000 Services never holds them all whole), `InitDone`
/// hands the whole list over; `Apply` and `Delete` are single objects.
fn step<K, B>(
    listing: &mut Listing<B>,
    event: watcher::Event<K>,
    prepare: impl Fn(&mut K),
    buffered: impl Fn(K) -> B,
) -> Step<K, B> {
    listing.error = None;
    match event {
        watcher::Event::Init => {
            listing.buffer = Some(Vec::new());
            Step::Nothing
        }
        watcher::Event::InitApply(mut o) => {
            prepare(&mut o);
            listing
                .buffer
                .get_or_insert_with(Vec::new)
                .push(buffered(o));
            Step::Nothing
        }
        watcher::Event::InitDone => {
            listing.listed = true;
            Step::Replace(listing.buffer.take().unwrap_or_default())
        }
        watcher::Event::Apply(mut o) => {
            prepare(&mut o);
            Step::Upsert(o)
        }
        watcher::Event::Delete(mut o) => {
            prepare(&mut o);
            Step::Delete(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml_ng::from_str(yaml).expect("a Service")
    }

    const SVC: &str = "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  resourceVersion: '17'
  uid: 0b6c
  labels: {app: web}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    #[test]
    fn metadata_is_stripped_to_what_translation_reads() {
        let mut s = svc(SVC);
        strip(&mut s.metadata);
        assert_eq!(s.metadata.name.as_deref(), Some("web"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
        assert!(
            s.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l["app"] == "web")
        );
        assert!(s.metadata.annotations.is_none());
        assert!(s.metadata.managed_fields.is_none());
        assert!(s.metadata.resource_version.is_none());
        assert!(s.spec.is_some());
    }

    #[test]
    fn nothing_is_ready_until_every_kind_listed_and_a_relist_replaces() {
        let mut st = KubeState::default();
        let mut t = ChangeTracker::new("node-a");
        let ev = |e| Update::Service(Box::new(e));
        assert_eq!(st.apply(ev(watcher::Event::Init), &mut t), Applied::Nothing);
        assert_eq!(
            st.apply(ev(watcher::Event::InitApply(svc(SVC))), &mut t),
            Applied::Nothing
        );
        assert_eq!(
            st.apply(ev(watcher::Event::InitDone), &mut t),
            Applied::Relisted(Kind::Services)
        );
        assert!(!st.ready());
        st.apply(Update::Slice(Box::new(watcher::Event::InitDone)), &mut t);
        st.apply(Update::Error(Kind::Node, "down".into()), &mut t);
        assert!(!st.ready());
        assert!(!st.connected());
        assert_eq!(st.errors(), vec!["Node: down".to_owned()]);
        st.apply(Update::Node(Box::new(watcher::Event::Init)), &mut t);
        st.apply(Update::Node(Box::new(watcher::Event::InitDone)), &mut t);
        assert!(st.ready());
        assert!(st.connected());
        t.flush();
        assert_eq!(t.target().frontends.len(), 1);
        // A relist without the Service deletes it.
        st.apply(ev(watcher::Event::Init), &mut t);
        st.apply(ev(watcher::Event::InitDone), &mut t);
        t.flush();
        assert!(t.target().frontends.is_empty());
    }
}
