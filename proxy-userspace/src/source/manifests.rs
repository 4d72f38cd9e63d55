//! Reads cluster objects from a manifests directory.
//!
//! The directory holds what `kubectl get -o yaml` / `-o json` prints: single objects,
//! multi-document YAML, `kind: List` wrappers. Only the kinds the proxy needs are kept
//! (Service, EndpointSlice, Node). Loading never fails as a whole: every file or object that
//! cannot be used becomes a [`Problem`] and the rest still loads, because one bad manifest must not
//! take every other Service down with it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;
use serde_json::Value;

use super::cluster::{ClusterObjects, Problem};
use crate::digest::DigestedObjects;

/// Whether `path` names a file [`load_dir`] reads: `*.yaml`, `*.yml` or `*.json`, not hidden.
///
/// Public so a directory watcher can ignore events for files that would not change the result
/// (editor swap and lock files, atomic-write temporaries, ConfigMap-mount `..data` links).
#[must_use]
pub fn is_manifest_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    // Hidden files cover vim's `.x.yaml.swp`, emacs' `.#x.yaml` lock links and the `.x.tmp`
    // files atomic writers rename into place; `~` backups and `#x#` autosaves fail the suffix test.
    if name.starts_with('.') {
        return false;
    }
    matches!(
        Path::new(name).extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads every manifest file directly in `dir` (see [`is_manifest_file`]), in file-name order,
/// with only the fields translation reads (see [`DirCache::load`]).
#[must_use]
pub fn load_dir(dir: &Path) -> ClusterObjects {
    DirCache::default().load(dir).unwrap_or_default()
}

/// What tells a file changed without reading it. An atomic rename changes the inode; an edit in
/// place changes the length or the modification/change times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    ctime: (i64, i64),
    ino: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

/// A manifests directory read repeatedly (every change event and every resync): only files whose
/// stamp changed are parsed again, and an unchanged directory costs a `stat` per file. Parsing
/// 10,000 Services' YAML takes ~2 s of CPU here, too much to repeat every 30 s.
///
/// A read that fails never deletes anything: an unreadable directory keeps every file's objects,
/// and an unreadable file, or one caught half-written (a syntax error, or empty, where the
/// previous read was fine), keeps the objects of its last good read, with the error reported.
/// Deleting Services takes deleting their objects or their file.
#[derive(Default)]
pub struct DirCache {
    files: BTreeMap<PathBuf, FileState>,
    /// Problems of the directory itself at the previous load.
    dir_problems: Vec<Problem>,
    primed: bool,
}

#[derive(Clone, Debug)]
struct FileState {
    /// `None`: the file could not be examined.
    stamp: Option<Stamp>,
    /// The objects of the last good read, with the object-level problems found in it; as
    /// digests, which are all translation needs and a fraction of the objects' size.
    good: DigestedObjects,
    /// Why the file's current contents are not what `good` says, if they are not.
    error: Vec<Problem>,
}

impl DirCache {
    /// Manifest files whose current contents could not be read or parsed (their last good
    /// objects stand in for them, if they ever had any).
    pub fn unread_files(&self) -> usize {
        self.files.values().filter(|f| !f.error.is_empty()).count()
    }

    /// Every object in `dir`, or `None` when nothing changed since the previous call (no manifest
    /// file added, removed or changed, and the same problems). The cache keeps digests, so the
    /// objects carry only what translation reads (`digest`).
    pub fn load(&mut self, dir: &Path) -> Option<ClusterObjects> {
        self.load_digested(dir).map(|d| {
            let mut out = ClusterObjects::default();
            d.expand_into(&mut out);
            out
        })
    }

    /// `load` as digests: what the change tracker keeps, without making whole objects of them
    /// in between (for 10,000 Services that was vipx's peak memory).
    pub fn load_digested(&mut self, dir: &Path) -> Option<DigestedObjects> {
        let mut dir_problems = Vec::new();
        let mut files = Vec::new();
        let listed = match fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    match entry {
                        Ok(entry) => {
                            let path = entry.path();
                            if is_manifest_file(&path) {
                                files.push(path);
                            }
                        }
                        Err(err) => dir_problems.push(Problem {
                            file: dir.to_path_buf(),
                            reason: format!(
                                "cannot list directory: {err}; files not listed keep their objects"
                            ),
                        }),
                    }
                }
                true
            }
            Err(err) => {
                dir_problems.push(Problem {
                    file: dir.to_path_buf(),
                    reason: format!("cannot read directory: {err}; every file keeps its objects"),
                });
                false
            }
        };
        files.sort();
        // A partial listing cannot tell a deleted file from one it missed.
        let complete = listed && dir_problems.is_empty();
        let mut changed = !self.primed || dir_problems != self.dir_problems;
        let mut next = BTreeMap::new();
        for path in files.into_iter().filter(|_| listed) {
            let prev = self.files.remove(&path);
            let existed = prev.is_some();
            let Some((state, reread)) = read_file_state(&path, prev) else {
                changed |= existed;
                continue;
            };
            changed |= reread;
            next.insert(path, state);
        }
        if complete {
            // Files that disappeared.
            changed |= !self.files.is_empty();
        } else {
            next.append(&mut self.files);
        }
        self.files = next;
        self.dir_problems = dir_problems;
        self.primed = true;
        if !changed {
            return None;
        }
        let mut out = DigestedObjects {
            problems: self.dir_problems.clone(),
            ..DigestedObjects::default()
        };
        for state in self.files.values() {
            out.extend_from(&state.good);
            out.problems.extend(state.error.iter().cloned());
        }
        Some(out)
    }
}

/// The state of one listed file after this load and whether it was read again, or `None` when
/// it is gone (deleted between listing and reading, or no longer a regular file).
fn read_file_state(path: &Path, prev: Option<FileState>) -> Option<(FileState, bool)> {
    let problem = |reason: String| {
        vec![Problem {
            file: path.to_path_buf(),
            reason,
        }]
    };
    // The file's contents are not used: keep what its last good read held. Returns whether the
    // result differs from `prev`.
    let keep = |prev: Option<FileState>, error: Vec<Problem>, stamp: Option<Stamp>| {
        let (good, old_error) = prev.map_or_else(Default::default, |p| (p.good, p.error));
        let kept = has_objects(&good);
        let error: Vec<Problem> = error
            .into_iter()
            .map(|p| Problem {
                reason: if kept {
                    format!("{}; keeping the objects of its last good read", p.reason)
                } else {
                    p.reason
                },
                ..p
            })
            .collect();
        let changed = error != old_error;
        (FileState { stamp, good, error }, changed)
    };
    // `fs::metadata` follows symlinks, so ConfigMap-style `x.yaml -> ..data/x.yaml` links load
    // while a directory that happens to be called `x.yaml` is skipped.
    let stamp = match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            tracing::debug!(path = %path.display(), "not a regular file, skipped");
            return None;
        }
        Ok(meta) => Stamp::of(&meta),
        // A file deleted between listing and reading is a normal race with whoever edits the
        // directory, not a broken manifest; the next reload sees the directory without it. A
        // symlink to nothing, though, is a mistake worth showing.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            fs::symlink_metadata(path).ok()?;
            return Some(keep(
                prev,
                problem("symlink to a missing file".to_owned()),
                None,
            ));
        }
        Err(err) => return Some(keep(prev, problem(format!("cannot read: {err}")), None)),
    };
    if prev.as_ref().is_some_and(|p| p.stamp == Some(stamp)) {
        return prev.map(|p| (p, false));
    }
    let (objs, suspect) = load_file(path);
    if suspect && prev.as_ref().is_some_and(|p| has_objects(&p.good)) {
        let mut error = objs.problems;
        if error.is_empty() {
            error = problem("empty file (delete the file to delete its objects)".to_owned());
        }
        let (state, _) = keep(prev, error, Some(stamp));
        return Some((state, true));
    }
    // A suspect file with nothing better to fall back on (new, or the first read after a
    // restart): its objects are used, and its problems mark it as not read cleanly, which a
    // restarted vipx waits on a little before deleting what the file held (`unread_files`).
    let (good, error) = if suspect {
        let mut good = objs;
        let error = std::mem::take(&mut good.problems);
        (good, error)
    } else {
        (objs, Vec::new())
    };
    let state = FileState {
        stamp: Some(stamp),
        good,
        error,
    };
    Some((state, true))
}

fn has_objects(objs: &DigestedObjects) -> bool {
    objs.has_objects()
}

/// The file's objects, and whether its contents as a whole look like a failed or interrupted
/// write (unreadable, not text, a syntax error, or empty), so that an earlier good read is
/// worth more than this one. Objects become digests as soon as they are parsed, so that a big
/// file is never held as whole objects.
fn load_file(path: &Path) -> (DigestedObjects, bool) {
    let mut digests = DigestedObjects::default();
    let mut out = ClusterObjects::default();
    let mut problem = |reason: String| {
        out.problems.push(Problem {
            file: path.to_path_buf(),
            reason,
        });
        true
    };
    let suspect = match fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => true,
            Ok(text) => load_text_into(path, &text, &mut out, Some(&mut digests)),
            Err(err) => problem(format!("not UTF-8 text: {}", err.utf8_error())),
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => problem(format!("cannot read: {err}")),
    };
    digests.absorb(&mut out);
    digests.problems = out.problems;
    digests.shrink_to_fit();
    (digests, suspect)
}

/// Parses `text` as if it were the file `name`: JSON when `name` ends in `.json`, YAML otherwise.
#[must_use]
pub fn load_str(name: &str, text: &str) -> ClusterObjects {
    load_text(Path::new(name), text).0
}

/// The objects, and whether some document did not parse at all.
fn load_text(file: &Path, text: &str) -> (ClusterObjects, bool) {
    let mut out = ClusterObjects::default();
    let syntax_error = load_text_into(file, text, &mut out, None);
    (out, syntax_error)
}

/// `load_text` into `out`, or, with `digests`, its objects into `digests` document by document
/// (only the problems into `out`). Returns whether some document did not parse at all.
fn load_text_into(
    file: &Path,
    text: &str,
    out: &mut ClusterObjects,
    mut digests: Option<&mut DigestedObjects>,
) -> bool {
    // A byte-order mark is legal in YAML but serde_json rejects it; editors on Windows add one.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = file.extension().and_then(|e| e.to_str()) == Some("json");
    let mut syntax_error = false;
    let mut add = |out: &mut ClusterObjects,
                   digests: &mut Option<&mut DigestedObjects>,
                   index: usize,
                   document: Result<Value, String>| {
        let location = format!("document {}", index + 1);
        match document {
            Ok(value) => {
                collect(value, &location, file, out, 0);
                if let Some(d) = digests {
                    d.absorb(out);
                }
            }
            Err(reason) => {
                syntax_error = true;
                out.problems.push(Problem {
                    file: file.to_path_buf(),
                    reason: format!("{location}: {reason}"),
                });
            }
        }
    };
    if is_json {
        for (index, document) in parse_json(text).into_iter().enumerate() {
            add(out, &mut digests, index, document);
        }
    } else if let Some(d) = digests.as_deref_mut()
        && text.len() >= PARALLEL_MIN_BYTES
        && parallelism() > 1
        && let Some(syntax_error) = load_yaml_parallel(file, text, out, d)
    {
        return syntax_error;
    } else if !parse_yaml(text, |index, value| {
        add(out, &mut digests, index, Ok(value));
    }) {
        *out = ClusterObjects::default();
        if let Some(d) = digests.as_deref_mut() {
            *d = DigestedObjects::default();
        }
        for (index, document) in parse_yaml_per_document(text).enumerate() {
            add(out, &mut digests, index, document);
        }
    }
    syntax_error
}

/// YAML files at least this large are parsed on every core ([`load_yaml_parallel`]).
const PARALLEL_MIN_BYTES: usize = 1 << 20;

fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A large YAML file read on every core: its documents split at their markers, each thread
/// parsing and digesting a contiguous run of them, the runs joined in file order. The objects
/// and problems are those of [`parse_yaml_per_document`] read in order (a syntax error costs only
/// its document). YAML parsing dominated vipx's start on a directory of 10,000 Services.
/// `None` for a file of one document (`kubectl get -o yaml` prints one `List`): nothing to
/// spread, the caller parses it as a stream.
fn load_yaml_parallel(
    file: &Path,
    text: &str,
    out: &mut ClusterObjects,
    digests: &mut DigestedObjects,
) -> Option<bool> {
    let chunks = split_yaml_documents(text);
    if chunks.len() < 2 {
        return None;
    }
    let per = chunks.len().div_ceil(parallelism()).max(1);
    let runs: Vec<(DigestedObjects, Vec<Problem>, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .chunks(per)
            .enumerate()
            .map(|(run, part)| {
                s.spawn(move || {
                    let mut objs = ClusterObjects::default();
                    let mut d = DigestedObjects::default();
                    let mut syntax_error = false;
                    for (j, (first_line, chunk)) in part.iter().enumerate() {
                        let location = format!("document {}", run * per + j + 1);
                        match parse_yaml_chunk(*first_line, chunk) {
                            Ok(value) => {
                                collect(value, &location, file, &mut objs, 0);
                                d.absorb(&mut objs);
                            }
                            Err(reason) => {
                                syntax_error = true;
                                objs.problems.push(Problem {
                                    file: file.to_path_buf(),
                                    reason: format!("{location}: {reason}"),
                                });
                            }
                        }
                    }
                    (d, objs.problems, syntax_error)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let problem = Problem {
                        file: file.to_path_buf(),
                        reason: "the YAML parser failed on part of this file".into(),
                    };
                    (DigestedObjects::default(), vec![problem], true)
                })
            })
            .collect()
    });
    let mut syntax_error = false;
    for (d, problems, bad) in runs {
        digests.append(d);
        out.problems.extend(problems);
        syntax_error |= bad;
    }
    Some(syntax_error)
}

/// One JSON value after another (`kubectl get -o json` prints one; concatenated output of
/// several commands is also accepted). JSON cannot be resynchronised after a syntax error, so
/// the values before it are kept and the rest of the file is one problem.
fn parse_json(text: &str) -> Vec<Result<Value, String>> {
    let mut documents = Vec::new();
    for value in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        match value {
            Ok(value) => documents.push(Ok(value)),
            Err(err) => {
                documents.push(Err(format!("invalid JSON: {err}")));
                break;
            }
        }
    }
    documents
}

/// Hands each document of a YAML stream to `each` (with its index) as soon as it is parsed: a
/// file of 10,000 Services held as `Value`s all at once took most of vipx's memory. Returns
/// false at the first syntax error: a syntax error in one document should cost only that
/// document, but libyaml cannot resume after an error (serde_yaml_ng's iterator would keep
/// returning it), so the caller drops what it got and reads the stream again with
/// [`parse_yaml_per_document`].
fn parse_yaml(text: &str, mut each: impl FnMut(usize, Value)) -> bool {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(document) {
            Ok(value) => each(index, value),
            Err(_) => return false,
        }
    }
    true
}

/// The documents one at a time, split at the `---` / `...` markers, which YAML only allows at
/// column 0 outside of any scalar.
fn parse_yaml_per_document(text: &str) -> impl Iterator<Item = Result<Value, String>> {
    split_yaml_documents(text)
        .into_iter()
        .map(|(first_line, chunk)| parse_yaml_chunk(first_line, &chunk))
}

/// One document of [`split_yaml_documents`]; an error names the line in the file.
fn parse_yaml_chunk(first_line: usize, chunk: &str) -> Result<Value, String> {
    parse_yaml_document(chunk).map_err(|err| {
        // Re-parse with the lines before the chunk blanked so the error names the line in the
        // file, not in the chunk. Only failing documents pay for this.
        let padded = format!("{}{chunk}", "\n".repeat(first_line));
        let err = parse_yaml_document(&padded).err().unwrap_or(err);
        format!("invalid YAML: {err}")
    })
}

/// Like `serde_yaml_ng::from_str`, but when libyaml ends the document early (bad indentation
/// after a complete document) it reports the error that follows rather than "more than one
/// document".
fn parse_yaml_document(chunk: &str) -> Result<Value, serde_yaml_ng::Error> {
    let mut documents = serde_yaml_ng::Deserializer::from_str(chunk);
    let Some(first) = documents.next() else {
        return Ok(Value::Null);
    };
    let value = Value::deserialize(first)?;
    match documents.next() {
        None => Ok(value),
        Some(second) => Err(Value::deserialize(second).err().unwrap_or_else(|| {
            serde::de::Error::custom("a second document without a `---` line before it")
        })),
    }
}

/// `(index of the chunk's first line, chunk text)` per document.
fn split_yaml_documents(text: &str) -> Vec<(usize, String)> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut first_line = 0;
    // Only directives, comments and blank lines so far: a `---` here starts this same document
    // (e.g. `%YAML 1.2` then `---`), so it must not be split off into an empty chunk.
    let mut only_preamble = true;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        let is_marker = |m: &str| {
            bare == m
                || bare
                    .strip_prefix(m)
                    .is_some_and(|rest| rest.starts_with([' ', '\t']))
        };
        if is_marker("...") {
            chunks.push((first_line, std::mem::take(&mut current)));
            first_line = index + 1;
            only_preamble = true;
            continue;
        }
        if is_marker("---") && !only_preamble {
            chunks.push((first_line, std::mem::take(&mut current)));
            first_line = index;
        }
        let trimmed = bare.trim_start();
        if !(trimmed.is_empty() || trimmed.starts_with('#') || bare.starts_with('%')) {
            only_preamble = false;
        }
        current.push_str(line);
    }
    chunks.push((first_line, current));
    chunks
}

/// Nested `List`s deeper than this are not what kubectl prints; stop rather than recurse forever.
const MAX_LIST_DEPTH: usize = 8;

fn collect(value: Value, location: &str, file: &Path, out: &mut ClusterObjects, depth: usize) {
    let problem = |out: &mut ClusterObjects, reason: String| {
        out.problems.push(Problem {
            file: file.to_path_buf(),
            reason: format!("{location}: {reason}"),
        });
    };
    let mut object = match value {
        // `---` at the end of a file, or a file of comments only.
        Value::Null => return,
        Value::Object(object) => object,
        other => {
            return problem(
                out,
                format!(
                    "expected a Kubernetes object, found {}",
                    json_type_name(&other)
                ),
            );
        }
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind.is_empty() {
        return problem(out, "object without a kind".to_owned());
    }

    // `kind: List` (kubectl's generic wrapper, items carry their own kind) and typed lists such as
    // `ServiceList` (raw API output, items carry no kind of their own).
    // A kind merely ending in "List" without items (some CRD) is left to the kind match below.
    if let Some(item_kind) = kind
        .strip_suffix("List")
        .filter(|_| kind == "List" || object.contains_key("items"))
    {
        let items = match object.remove("items") {
            Some(Value::Array(items)) => items,
            // The API serialises an empty list as `items: null` or leaves it out.
            None | Some(Value::Null) => return,
            Some(_) => return problem(out, format!("{kind} whose items is not a list")),
        };
        if depth >= MAX_LIST_DEPTH {
            return problem(
                out,
                format!("{kind} nested more than {MAX_LIST_DEPTH} deep"),
            );
        }
        for (index, mut item) in items.into_iter().enumerate() {
            if let (Value::Object(fields), false) = (&mut item, item_kind.is_empty()) {
                fields
                    .entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_owned()));
                fields
                    .entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.clone()));
            }
            collect(
                item,
                &format!("{location} items[{index}]"),
                file,
                out,
                depth + 1,
            );
        }
        return;
    }

    let what = describe(&kind, &object);
    let value = Value::Object(object);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match serde_json::from_value::<Service>(value) {
            Ok(service) => out.services.push(service),
            Err(err) => problem(out, format!("{what}: {err}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(value) {
                Ok(slice) => out.slices.push(slice),
                Err(err) => problem(out, format!("{what}: {err}")),
            }
        }
        ("v1", "Node") => match serde_json::from_value::<Node>(value) {
            Ok(node) => out.nodes.push(node),
            Err(err) => problem(out, format!("{what}: {err}")),
        },
        // Deployments, ConfigMaps, a Knative `serving.knative.dev/v1 Service`, ...: manifests
        // directories commonly hold whole applications.
        _ => {
            tracing::debug!(file = %file.display(), %location, %api_version, %kind, "kind ignored")
        }
    }
}

/// `Service default/web` for problem messages, from the raw object so it works even when the
/// object does not deserialize.
fn describe(kind: &str, object: &serde_json::Map<String, Value>) -> String {
    let meta = object.get("metadata");
    let field = |name: &str| meta.and_then(|m| m.get(name)).and_then(Value::as_str);
    match (field("namespace"), field("name")) {
        (Some(namespace), Some(name)) => format!("{kind} {namespace}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} without a name"),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: simpleapi-service
  namespace: default
spec:
  clusterIP: 10.102.82.168
  clusterIPs:
  - 10.102.82.168
  ports:
  - port: 80
    protocol: TCP
    targetPort: 5000
  selector:
    app: backend
  type: ClusterIP
";

    const SLICE: &str = "\
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
  nodeName: worker-1
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: simpleapi-service
  name: simpleapi-service-7xk2p
  namespace: default
ports:
- name: \"\"
  port: 5000
  protocol: TCP
";

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  labels:
    topology.kubernetes.io/zone: zone-a
  name: worker-1
";

    fn names(objs: &ClusterObjects) -> Vec<String> {
        let services = objs
            .services
            .iter()
            .map(|s| format!("svc/{}", s.metadata.name.as_deref().unwrap_or("?")));
        let slices = objs
            .slices
            .iter()
            .map(|s| format!("slice/{}", s.metadata.name.as_deref().unwrap_or("?")));
        let nodes = objs
            .nodes
            .iter()
            .map(|n| format!("node/{}", n.metadata.name.as_deref().unwrap_or("?")));
        services.chain(slices).chain(nodes).collect()
    }

    /// A directory under the system temp dir, removed on drop (also when the test fails).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("vipx-source-{tag}-{}-{n}", std::process::id()));
            // Leftover from a crashed run with the same pid: start clean.
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, contents: impl AsRef<[u8]>) {
            fs::write(self.0.join(name), contents).expect("write fixture");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A file large enough to be parsed on every core gives the objects and problems of the
    /// one-thread parse, in order, a syntax error costing only its document.
    #[test]
    fn a_large_file_parsed_on_every_core_matches_the_one_thread_parse() {
        let mut text = String::new();
        let mut i = 0;
        while text.len() < PARALLEL_MIN_BYTES + PARALLEL_MIN_BYTES / 2 {
            let svc = SERVICE.replace("simpleapi-service", &format!("svc-{i}"));
            let slice = SLICE.replace("simpleapi-service", &format!("svc-{i}"));
            text.push_str(&format!("---\n{svc}---\n{slice}"));
            if i == 1000 {
                text.push_str("---\nkind: Service\nmetadata: {name: [broken\n");
            }
            if i == 1500 {
                text.push_str(&format!("---\n{NODE}"));
            }
            i += 1;
        }
        let dir = TempDir::new("parallel");
        dir.write("big.yaml", &text);
        let (parallel, suspect) = load_file(&dir.0.join("big.yaml"));
        assert!(suspect, "a syntax error makes the read suspect");
        let (serial, _) = load_text(&dir.0.join("big.yaml"), &text);
        assert_eq!(serial.services.len(), i);
        assert_eq!(serial.problems.len(), 1, "{:?}", serial.problems);
        let serial = DigestedObjects::of(serial);
        assert_eq!(
            format!("{:?}", parallel.services),
            format!("{:?}", serial.services)
        );
        assert_eq!(
            format!("{:?}", parallel.slices),
            format!("{:?}", serial.slices)
        );
        assert_eq!(
            format!("{:?}", parallel.nodes),
            format!("{:?}", serial.nodes)
        );
        assert_eq!(parallel.problems, serial.problems);

        // Without a syntax error the one-thread parse streams the file: a per-document problem
        // (a Service whose spec is not an object) is numbered alike.
        let clean = text.replace(
            "---\nkind: Service\nmetadata: {name: [broken\n",
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: odd}\nspec: 7\n",
        );
        dir.write("big.yaml", &clean);
        let (parallel, suspect) = load_file(&dir.0.join("big.yaml"));
        assert!(!suspect);
        let (serial, syntax_error) = load_text(&dir.0.join("big.yaml"), &clean);
        assert!(!syntax_error);
        assert_eq!(serial.problems.len(), 1, "{:?}", serial.problems);
        let serial = DigestedObjects::of(serial);
        assert_eq!(
            format!("{:?}", parallel.services),
            format!("{:?}", serial.services)
        );
        assert_eq!(parallel.problems, serial.problems);
    }

    #[test]
    fn multi_document_yaml() {
        let text = format!("---\n{SERVICE}---\n{SLICE}\n---\n{NODE}---\n");
        let objs = load_str("all.yaml", &text);
        assert_eq!(objs.problems, []);
        assert_eq!(
            names(&objs),
            [
                "svc/simpleapi-service",
                "slice/simpleapi-service-7xk2p",
                "node/worker-1"
            ]
        );
    }

    #[test]
    fn empty_and_comment_only_documents_are_ignored() {
        let text = format!("# header comment\n---\n---\n# nothing\n---\n{SERVICE}...\n");
        let objs = load_str("svc.yaml", &text);
        assert_eq!(objs.problems, []);
        assert_eq!(names(&objs), ["svc/simpleapi-service"]);
        assert!(load_str("empty.yaml", "").problems.is_empty());
        assert!(load_str("empty.json", "").problems.is_empty());
    }

    #[test]
    fn kind_list_as_kubectl_prints_it() {
        let indent = |s: &str| s.lines().map(|l| format!("  {l}\n")).collect::<String>();
        let item = |s: &str| {
            let body = indent(s);
            format!("-{}", &body[1..])
        };
        let text = format!(
            "apiVersion: v1\nitems:\n{}{}kind: List\nmetadata:\n  resourceVersion: \"\"\n",
            item(SERVICE),
            item(SLICE)
        );
        let objs = load_str("list.yaml", &text);
        assert_eq!(objs.problems, []);
        assert_eq!(
            names(&objs),
            ["svc/simpleapi-service", "slice/simpleapi-service-7xk2p"]
        );
    }

    #[test]
    fn typed_list_items_inherit_kind_and_nested_lists_recurse() {
        let text = r#"{
          "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "NodeList", "items": [
              {"metadata": {"name": "worker-1"}},
              {"metadata": {"name": "worker-2"}}
            ]},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}}
          ]
        }"#;
        let objs = load_str("nodes.json", text);
        assert_eq!(objs.problems, []);
        assert_eq!(names(&objs), ["node/worker-1", "node/worker-2"]);
    }

    #[test]
    fn json_single_object_and_list() {
        let svc: Value = serde_yaml_ng::from_str(SERVICE).expect("fixture");
        let slice: Value = serde_yaml_ng::from_str(SLICE).expect("fixture");
        let objs = load_str("svc.json", &svc.to_string());
        assert_eq!(objs.problems, []);
        assert_eq!(names(&objs), ["svc/simpleapi-service"]);

        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [svc, slice]});
        let objs = load_str(
            "list.json",
            &serde_json::to_string_pretty(&list).expect("json"),
        );
        assert_eq!(objs.problems, []);
        assert_eq!(
            names(&objs),
            ["svc/simpleapi-service", "slice/simpleapi-service-7xk2p"]
        );
    }

    #[test]
    fn unknown_kinds_are_ignored_silently() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: backend\n---\n\
             apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: knative\n---\n\
             apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: old\n---\n\
             {SERVICE}"
        );
        let objs = load_str("app.yaml", &text);
        assert_eq!(objs.problems, []);
        assert_eq!(names(&objs), ["svc/simpleapi-service"]);
    }

    #[test]
    fn malformed_object_among_good_ones() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: default\n\
                   spec:\n  ports:\n  - port: eighty\n";
        let text = format!("{SERVICE}---\n{bad}---\n{SLICE}---\n42\n");
        let objs = load_str("mixed.yaml", &text);
        assert_eq!(
            names(&objs),
            ["svc/simpleapi-service", "slice/simpleapi-service-7xk2p"]
        );
        assert_eq!(objs.problems.len(), 2, "{:?}", objs.problems);
        let first = objs.problems[0].to_string();
        assert!(
            first.starts_with("mixed.yaml: document 2: Service default/broken: "),
            "{first}"
        );
        let second = objs.problems[1].to_string();
        assert!(
            second.starts_with("mixed.yaml: document 4: expected a Kubernetes object"),
            "{second}"
        );
    }

    #[test]
    fn yaml_syntax_error_costs_only_its_document() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n";
        let text = format!("{SERVICE}---\n{bad}---\n{SLICE}");
        let objs = load_str("broken.yaml", &text);
        assert_eq!(
            names(&objs),
            ["svc/simpleapi-service", "slice/simpleapi-service-7xk2p"]
        );
        assert_eq!(objs.problems.len(), 1, "{:?}", objs.problems);
        let reason = &objs.problems[0].reason;
        assert!(reason.starts_with("document 2: invalid YAML: "), "{reason}");
        // The error names the line in the file, not in the document.
        let bad_line = SERVICE.lines().count() + 4;
        assert!(reason.contains(&format!("line {bad_line}")), "{reason}");
    }

    #[test]
    fn missing_kind_and_garbage_are_problems() {
        let objs = load_str("nokind.yaml", "metadata:\n  name: x\n");
        assert_eq!(objs.problems.len(), 1);
        assert!(objs.problems[0].reason.contains("without a kind"));

        let objs = load_str("garbage.json", "{\"kind\": \"Service\", ");
        assert_eq!(objs.problems.len(), 1);
        assert!(
            objs.problems[0].reason.contains("invalid JSON"),
            "{}",
            objs.problems[0]
        );

        let objs = load_str("garbage.yaml", "\t: : :\n{[}\n");
        assert_eq!(names(&objs), Vec::<String>::new());
        assert_eq!(objs.problems.len(), 1, "{:?}", objs.problems);
    }

    #[test]
    fn split_keeps_directives_with_their_document() {
        let chunks = split_yaml_documents("%YAML 1.2\n---\na: 1\n--- # two\nb: 2\n...\n");
        let texts: Vec<_> = chunks.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["%YAML 1.2\n---\na: 1\n", "--- # two\nb: 2\n", ""]);
        assert_eq!(
            chunks.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            [0, 3, 6]
        );
    }

    #[test]
    fn load_dir_reads_manifests_in_name_order_and_reports_bad_files() {
        let dir = TempDir::new("dir");
        dir.write("20-slice.yml", SLICE);
        dir.write("10-service.yaml", SERVICE);
        let node: Value = serde_yaml_ng::from_str(NODE).expect("fixture");
        dir.write("30-node.json", node.to_string());
        dir.write("40-garbage.yaml", [0xff, 0xfe, 0x00, 0x81, b'\n']);
        dir.write("50-bad.yaml", "kind: Service\napiVersion: v1\nspec: [\n");
        // Not manifests: never read, so their broken contents cause no problem.
        for ignored in [
            ".#10-service.yaml",
            ".10-service.yaml.swp",
            "10-service.yaml~",
            "README.md",
        ] {
            dir.write(ignored, "{{{ not yaml");
        }
        fs::create_dir(dir.0.join("subdir.yaml")).expect("mkdir");
        std::os::unix::fs::symlink(dir.0.join("gone.yaml"), dir.0.join("60-dangling.yaml"))
            .expect("symlink");
        dir.write("subdir.yaml/inner.yaml", SERVICE);

        let objs = load_dir(&dir.0);
        assert_eq!(
            names(&objs),
            [
                "svc/simpleapi-service",
                "slice/simpleapi-service-7xk2p",
                "node/worker-1"
            ]
        );
        let problems: Vec<_> = objs.problems.iter().map(|p| p.file.clone()).collect();
        assert_eq!(
            problems,
            [
                dir.0.join("40-garbage.yaml"),
                dir.0.join("50-bad.yaml"),
                dir.0.join("60-dangling.yaml")
            ]
        );
        assert!(
            objs.problems[0].reason.contains("not UTF-8"),
            "{}",
            objs.problems[0]
        );
    }

    #[test]
    fn dir_cache_reparses_only_on_change() {
        let dir = TempDir::new("cache");
        dir.write("10-service.yaml", SERVICE);
        let mut cache = DirCache::default();
        let first = cache.load(&dir.0).expect("first read");
        assert_eq!(first.services.len(), 1);
        assert!(cache.load(&dir.0).is_none(), "nothing changed");

        // An atomic replace (new inode) and an added file are both seen.
        let tmp = dir.0.join(".10-service.yaml.tmp");
        fs::write(
            &tmp,
            SERVICE.replace("name: simpleapi-service", "name: web2"),
        )
        .expect("write");
        fs::rename(&tmp, dir.0.join("10-service.yaml")).expect("rename");
        let second = cache.load(&dir.0).expect("changed");
        assert_eq!(second.services[0].metadata.name.as_deref(), Some("web2"));
        dir.write("20-other.yaml", SERVICE);
        assert_eq!(cache.load(&dir.0).expect("added").services.len(), 2);

        // A removed file is seen too.
        fs::remove_file(dir.0.join("20-other.yaml")).expect("rm");
        assert_eq!(cache.load(&dir.0).expect("removed").services.len(), 1);
        assert!(cache.load(&dir.0).is_none());
    }

    fn service_names(objs: &ClusterObjects) -> Vec<&str> {
        objs.services
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect()
    }

    #[test]
    fn a_half_written_file_keeps_its_last_good_objects() {
        let dir = TempDir::new("half");
        dir.write("10-service.yaml", SERVICE);
        dir.write(
            "20-other.yaml",
            SERVICE.replace("simpleapi-service", "other"),
        );
        let mut cache = DirCache::default();
        let first = cache.load(&dir.0).expect("first read");
        assert_eq!(service_names(&first), ["simpleapi-service", "other"]);

        // Cut mid-document: a syntax error where the previous read was fine.
        let cut = &SERVICE[..SERVICE.find("  ports:").unwrap() + 12];
        dir.write("10-service.yaml", format!("{cut}\n  - [port: 80\n"));
        let objs = cache.load(&dir.0).expect("changed");
        assert_eq!(service_names(&objs), ["simpleapi-service", "other"]);
        assert_eq!(objs.problems.len(), 1, "{:?}", objs.problems);
        let reason = &objs.problems[0].reason;
        assert!(reason.contains("invalid YAML"), "{reason}");
        assert!(
            reason.contains("keeping the objects of its last good read"),
            "{reason}"
        );
        assert!(cache.load(&dir.0).is_none(), "the same error is no change");

        // Truncated to nothing (an editor's truncate-then-write caught in between).
        dir.write("10-service.yaml", "");
        let objs = cache.load(&dir.0).expect("changed");
        assert_eq!(service_names(&objs), ["simpleapi-service", "other"]);
        assert!(
            objs.problems[0].reason.starts_with("empty file"),
            "{:?}",
            objs.problems
        );

        // Written in full: the new contents count.
        dir.write(
            "10-service.yaml",
            SERVICE.replace("simpleapi-service", "renamed"),
        );
        let objs = cache.load(&dir.0).expect("changed");
        assert_eq!(service_names(&objs), ["renamed", "other"]);
        assert_eq!(objs.problems, []);

        // A file whose objects are invalid but whose syntax is fine: only that object goes.
        dir.write(
            "10-service.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: eighty}]}\n",
        );
        let objs = cache.load(&dir.0).expect("changed");
        assert_eq!(service_names(&objs), ["other"]);
        assert_eq!(objs.problems.len(), 1);
        assert!(!objs.problems[0].reason.contains("keeping"));

        // A deleted file is deleted.
        fs::remove_file(dir.0.join("20-other.yaml")).expect("rm");
        assert_eq!(
            service_names(&cache.load(&dir.0).expect("removed")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn an_unreadable_file_or_directory_deletes_nothing() {
        let dir = TempDir::new("unreadable");
        dir.write("10-service.yaml", SERVICE);
        let mut cache = DirCache::default();
        assert_eq!(cache.load(&dir.0).expect("first").services.len(), 1);

        // The file becomes unreadable (a symlink to nothing: permissions do not stop root).
        let file = dir.0.join("10-service.yaml");
        fs::remove_file(&file).expect("rm");
        std::os::unix::fs::symlink(dir.0.join("gone.yaml"), &file).expect("symlink");
        let objs = cache.load(&dir.0).expect("changed");
        assert_eq!(service_names(&objs), ["simpleapi-service"]);
        assert_eq!(objs.problems.len(), 1);
        assert!(
            objs.problems[0].reason.contains("keeping"),
            "{}",
            objs.problems[0]
        );
        assert!(cache.load(&dir.0).is_none());
        fs::remove_file(&file).expect("rm");
        dir.write("10-service.yaml", SERVICE);
        let objs = cache.load(&dir.0).expect("readable again");
        assert_eq!((objs.services.len(), objs.problems.len()), (1, 0));

        // The whole directory becomes unreadable.
        let moved = dir.0.with_extension("moved");
        fs::rename(&dir.0, &moved).expect("rename");
        let objs = cache.load(&dir.0);
        fs::rename(&moved, &dir.0).expect("rename back");
        let objs = objs.expect("a new problem is a change");
        assert_eq!(service_names(&objs), ["simpleapi-service"]);
        assert_eq!(objs.problems.len(), 1);
        assert!(objs.problems[0].reason.contains("cannot read directory"));
        let objs = cache.load(&dir.0).expect("the problem went away");
        assert_eq!((objs.services.len(), objs.problems.len()), (1, 0));
        assert!(cache.load(&dir.0).is_none());
    }

    #[test]
    fn load_dir_on_a_missing_directory_is_a_problem() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("nope");
        let objs = load_dir(&missing);
        assert_eq!(objs.problems.len(), 1);
        assert_eq!(objs.problems[0].file, missing);
    }

    #[test]
    fn fixture_directory_loads_cleanly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
        let objs = load_dir(&dir);
        assert_eq!(objs.problems, []);
        assert!(!objs.services.is_empty() && !objs.slices.is_empty() && !objs.nodes.is_empty());
    }

    #[test]
    fn is_manifest_file_filter() {
        for yes in ["a.yaml", "dir/b.yml", "c.json", "svc.v2.yaml"] {
            assert!(is_manifest_file(Path::new(yes)), "{yes}");
        }
        for no in [
            ".a.yaml",
            ".#a.yaml",
            "a.yaml~",
            "#a.yaml#",
            "a.yaml.swp",
            "a.txt",
            "yaml",
            "..data",
        ] {
            assert!(!is_manifest_file(Path::new(no)), "{no}");
        }
    }
}
