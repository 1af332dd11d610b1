//! A fake of the few kube-apiserver endpoints the agent uses, written from the
//! Kubernetes API conventions (no kube-apiserver can run here): list and watch of
//! pods (with field selectors) and NetworkAttachmentDefinitions, GET of one object,
//! merge-PATCH of a pod's status, and POST of core/v1 Events. HTTP/1.1 on a loopback port, keep-alive, watches
//! as chunked streams of JSON lines. Every request is recorded for assertions.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Nad,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Nad => "network-attachment-definitions",
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl RecordedRequest {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    kind_name: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    events: Vec<Event>,
    requests: Vec<RecordedRequest>,
    /// While set, watches deliver nothing new (to make the client's cache stale).
    hold_watches: bool,
    /// Per kind, the resourceVersion some watch stream has caught up to.
    delivered: BTreeMap<Kind, u64>,
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 of the calling thread's network namespace.
    pub fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake apiserver");
        Self::serve(listener)
    }

    /// Listens on 127.0.0.1 inside the network namespace at `netns` (where the agent
    /// runs), serving from this process.
    pub fn start_in(netns: &crate::netns::Netns) -> FakeApiServer {
        let listener = std::thread::scope(|sc| {
            sc.spawn(|| {
                // A short-lived thread of its own; the socket keeps the namespace.
                netns.enter_this_thread();
                TcpListener::bind("127.0.0.1:0").expect("bind fake apiserver")
            })
            .join()
            .expect("bind thread")
        });
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> FakeApiServer {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.lock().stopped {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve_conn(&s, conn));
            }
        });
        FakeApiServer { shared, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server with no credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\nusers:\n- name: nobody\n  user: {{}}\ncurrent-context: fake\n",
            self.url()
        )
    }

    fn put(&self, kind: Kind, mut object: Value) -> u64 {
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let meta = &object["metadata"];
        let key = (
            kind,
            meta["namespace"].as_str().unwrap_or_default().to_string(),
            meta["name"].as_str().unwrap_or_default().to_string(),
        );
        let kind_name = if let Some(old) = st.objects.get(&key) {
            object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            "MODIFIED"
        } else {
            // Set at creation as the API server does; from a clock that ticks one
            // second per write, so that creation order is what tests wrote.
            object["metadata"]["creationTimestamp"] = json!(format!(
                "2026-01-01T{:02}:{:02}:{:02}Z",
                (rv / 3600) % 24,
                (rv / 60) % 60,
                rv % 60
            ));
            "ADDED"
        };
        st.objects.insert(key, object.clone());
        st.events.push(Event {
            rv,
            kind,
            kind_name,
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// Creates or replaces a pod scheduled to `node`; returns its resourceVersion.
    pub fn put_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        annotations: &BTreeMap<String, String>,
    ) -> u64 {
        self.put(
            Kind::Pod,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": namespace, "uid": uid,
                    "annotations": annotations,
                    "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                },
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
                "status": {"phase": "Pending"},
            }),
        )
    }

    /// As `put_pod`, with these containers in its spec (security contexts and all).
    pub fn put_pod_with_containers(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        annotations: &BTreeMap<String, String>,
        containers: Value,
    ) -> u64 {
        self.put(
            Kind::Pod,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": namespace, "uid": uid,
                    "annotations": annotations,
                },
                "spec": {"nodeName": node, "containers": containers},
                "status": {"phase": "Pending"},
            }),
        )
    }

    /// Creates or replaces a NetworkAttachmentDefinition; returns its resourceVersion.
    pub fn put_nad(&self, namespace: &str, name: &str, config: &Value) -> u64 {
        self.put_nad_annotated(namespace, name, config, &BTreeMap::new())
    }

    /// A NetworkAttachmentDefinition with annotations (`trellis.dev/acl`).
    pub fn put_nad_annotated(
        &self,
        namespace: &str,
        name: &str,
        config: &Value,
        annotations: &BTreeMap<String, String>,
    ) -> u64 {
        self.put(
            Kind::Nad,
            json!({
                "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": name, "namespace": namespace, "uid": format!("nad-{namespace}-{name}"),
                             "annotations": annotations},
                "spec": {"config": config.to_string()},
            }),
        )
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(Kind::Pod, namespace.into(), name.into()))
            .cloned()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Stops (or resumes) delivering events to open watches.
    pub fn hold_watches(&self, hold: bool) {
        self.shared.lock().hold_watches = hold;
        self.shared.changed.notify_all();
    }

    /// Waits until a watch of `kind` has been sent everything up to `rv`.
    pub fn wait_delivered(&self, kind: Kind, rv: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.delivered.get(&kind).copied().unwrap_or(0) < rv {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

struct Response {
    status: u16,
    body: Value,
}

fn status_error(code: u16, reason: &str, message: String) -> Response {
    Response {
        status: code,
        body: json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    }
}

fn serve_conn(shared: &Shared, conn: TcpStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    while let Some(req) = read_request(&mut reader) {
        shared.lock().requests.push(req.clone());
        let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let route = route(&segs);
        let resp = match (req.method.as_str(), route) {
            ("GET", Some(Route::Collection(kind, ns))) if req.is_watch() => {
                watch(shared, &mut out, kind, ns, &req.query);
                return;
            }
            ("GET", Some(Route::Collection(kind, ns))) => list(shared, kind, ns, &req.query),
            ("GET", Some(Route::Object(kind, ns, name, false))) => get(shared, kind, ns, name),
            ("PATCH", Some(Route::Object(Kind::Pod, ns, name, _))) => patch(shared, ns, name, &req),
            ("POST", None) => match segs.as_slice() {
                ["api", "v1", "namespaces", ns, "events"] => create_event(ns, &req),
                _ => status_error(405, "MethodNotAllowed", format!("POST {}", req.path)),
            },
            _ => status_error(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({} {})",
                    req.method, req.path
                ),
            ),
        };
        let body = resp.body.to_string();
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            resp.status,
            if resp.status < 300 { "OK" } else { "Error" },
            body.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(body.as_bytes()).is_err() {
            return;
        }
    }
}

enum Route<'a> {
    /// A list/watch, in one namespace or all.
    Collection(Kind, Option<&'a str>),
    /// One object; `true` for its status subresource.
    Object(Kind, &'a str, &'a str, bool),
}

fn route<'a>(segs: &[&'a str]) -> Option<Route<'a>> {
    let (kind, rest) = match segs {
        ["api", "v1", rest @ ..] => (Kind::Pod, rest),
        ["apis", "k8s.cni.cncf.io", "v1", rest @ ..] => (Kind::Nad, rest),
        _ => return None,
    };
    let plural = kind.plural();
    match rest {
        [p] if *p == plural => Some(Route::Collection(kind, None)),
        ["namespaces", ns, p] if *p == plural => Some(Route::Collection(kind, Some(ns))),
        ["namespaces", ns, p, name] if *p == plural => Some(Route::Object(kind, ns, name, false)),
        ["namespaces", ns, p, name, "status"] if *p == plural => {
            Some(Route::Object(kind, ns, name, true))
        }
        _ => None,
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<RecordedRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(RecordedRequest {
        method,
        path: percent_decode(path),
        query,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a.b=c,d!=e` against an object, as the API server's field selectors for the
/// fields used here.
fn fields_match(object: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, want, negate) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once("==") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once('=') {
            (p, v, false)
        } else {
            return false;
        };
        let got = path
            .split('.')
            .fold(object, |o, k| &o[k])
            .as_str()
            .unwrap_or_default();
        (got == want) != negate
    })
}

fn selected<'a>(
    kind: Kind,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
    object: &'a Value,
    obj_kind: Kind,
) -> Option<&'a Value> {
    (obj_kind == kind
        && ns.is_none_or(|n| object["metadata"]["namespace"] == n)
        && fields_match(object, q.get("fieldSelector")))
    .then_some(object)
}

fn list(shared: &Shared, kind: Kind, ns: Option<&str>, q: &BTreeMap<String, String>) -> Response {
    let st = shared.lock();
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter_map(|((k, _, _), o)| selected(kind, ns, q, o, *k))
        .collect();
    let (api_version, list_kind) = match kind {
        Kind::Pod => ("v1", "PodList"),
        Kind::Nad => ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinitionList"),
    };
    Response {
        status: 200,
        body: json!({
            "apiVersion": api_version, "kind": list_kind,
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    }
}

fn get(shared: &Shared, kind: Kind, ns: &str, name: &str) -> Response {
    match shared.lock().objects.get(&(kind, ns.into(), name.into())) {
        Some(o) => Response {
            status: 200,
            body: o.clone(),
        },
        None => status_error(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.plural()),
        ),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch(shared: &Shared, ns: &str, name: &str, req: &RecordedRequest) -> Response {
    let ctype = req.headers.get("content-type").cloned().unwrap_or_default();
    if ctype != "application/merge-patch+json" {
        return status_error(
            415,
            "UnsupportedMediaType",
            format!("the fake only takes merge patches, not {ctype:?}"),
        );
    }
    let Ok(p) = serde_json::from_str::<Value>(&req.body) else {
        return status_error(400, "BadRequest", "patch body is not JSON".into());
    };
    let mut st = shared.lock();
    let key = (Kind::Pod, ns.to_string(), name.to_string());
    let Some(mut pod) = st.objects.get(&key).cloned() else {
        return status_error(404, "NotFound", format!("pods \"{name}\" not found"));
    };
    // As the API server: a patch naming another uid (a pod of the same name made
    // again) is refused, metadata.uid being immutable.
    if let Some(uid) = p["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(uid) {
            return status_error(
                422,
                "Invalid",
                format!("Pod \"{name}\" is invalid: metadata.uid: Invalid value: \"{uid}\": field is immutable"),
            );
        }
    }
    merge_patch(&mut pod, &p);
    st.rv += 1;
    let rv = st.rv;
    pod["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.objects.insert(key, pod.clone());
    st.events.push(Event {
        rv,
        kind: Kind::Pod,
        kind_name: "MODIFIED",
        object: pod.clone(),
    });
    drop(st);
    shared.changed.notify_all();
    Response {
        status: 200,
        body: pod,
    }
}

/// POST of a core/v1 Event: checked for what the API server requires, and answered
/// as created (the recorded request is what tests read).
fn create_event(ns: &str, req: &RecordedRequest) -> Response {
    let Ok(mut ev) = serde_json::from_str::<Value>(&req.body) else {
        return status_error(400, "BadRequest", "event body is not JSON".into());
    };
    let meta = &ev["metadata"];
    let named = meta["name"]
        .as_str()
        .is_some_and(|n| !n.is_empty() && n.len() <= 253)
        || meta["generateName"].as_str().is_some_and(|n| !n.is_empty());
    if !named || ev["involvedObject"]["namespace"] != ns || meta["namespace"] != ns {
        return status_error(
            422,
            "Invalid",
            "event needs metadata.name or generateName (<= 253 characters) and the request's namespace on itself and its involvedObject".into(),
        );
    }
    if ev["metadata"]["name"].is_null() {
        let base: String = meta["generateName"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(58)
            .collect();
        ev["metadata"]["name"] = json!(format!("{base}x7k2q"));
    }
    Response {
        status: 201,
        body: ev,
    }
}

fn write_chunk(out: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    out.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    out.write_all(data)?;
    out.write_all(b"\r\n")
}

fn watch(
    shared: &Shared,
    out: &mut TcpStream,
    kind: Kind,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) {
    let mut since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    loop {
        let mut batch = Vec::new();
        {
            let mut st = shared.lock();
            loop {
                if st.stopped || Instant::now() >= deadline {
                    drop(st);
                    let _ = out.write_all(b"0\r\n\r\n");
                    return;
                }
                if !st.hold_watches && st.events.last().is_some_and(|e| e.rv > since) {
                    break;
                }
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            for e in st.events.iter().filter(|e| e.rv > since) {
                if selected(kind, ns, q, &e.object, e.kind).is_some() {
                    batch.push(json!({"type": e.kind_name, "object": e.object}).to_string());
                }
            }
            since = st.rv;
        }
        for line in batch {
            if write_chunk(out, format!("{line}\n").as_bytes()).is_err() {
                return;
            }
        }
        let mut st = shared.lock();
        let d = st.delivered.entry(kind).or_insert(0);
        *d = (*d).max(since);
        drop(st);
        shared.changed.notify_all();
    }
}
