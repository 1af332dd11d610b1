#!/usr/bin/env python3
"""Checks deploy/ (run by scripts/check-deploy.sh, in its venv): every object against
the Kubernetes schemas in strict mode (unknown fields are errors), the NADs against the
CRD's own schema, the NADs' CNI configs and ACLs, the references between objects
(volumes, ConfigMap keys, service account, RBAC, NADs and device pools named by pods),
the agent's paths against the DaemonSet's mounts, and the ConfigMap's agent.toml and
device-config.json through the trellis binary itself. Every problem is printed as
`FILE:LINE KIND/NAME: WHERE: WHAT`; any problem fails the check."""

import argparse
import ipaddress
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import importlib_resources
import jsonschema
import referencing
import yaml

PROBLEMS = []


def problem(where, msg):
    PROBLEMS.append(f"{where}: {msg}")


# ---------------------------------------------------------------------------
# YAML: every document with its line; a key given twice is an error (the API server's
# strict decoding rejects it; PyYAML would keep the last silently).


class StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"key {key!r} given twice (first on line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


class Obj:
    """One object of a file: its data and where it is."""

    def __init__(self, path, node, data):
        self.path, self.node, self.data = path, node, data
        self.line = node.start_mark.line + 1

    @property
    def kind(self):
        return self.data.get("kind", "?")

    @property
    def name(self):
        return (self.data.get("metadata") or {}).get("name", "?")

    @property
    def namespace(self):
        return (self.data.get("metadata") or {}).get("namespace")

    def at(self, field=None, line=None):
        if line is None and field:
            line = self.line_of_field(field)
        w = f"{self.path}:{line or self.line} {self.kind}/{self.name}"
        return f"{w}: {field}" if field else w

    def line_of(self, path):
        """The line of the field at `path` (keys and indexes), or of its nearest parent
        the file has."""
        node, line = self.node, self.line
        for step in path:
            if isinstance(node, yaml.MappingNode):
                pair = next(((k, v) for k, v in node.value if k.value == str(step)), None)
                if pair is None:
                    break
                line, node = pair[0].start_mark.line + 1, pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def line_of_field(self, field):
        """line_of for a field written as in the messages: `a.b[2].c` (keys may hold
        dots, as annotation keys do: the longest key that fits is taken)."""
        node, line, rest = self.node, self.line, field
        while rest:
            if isinstance(node, yaml.SequenceNode):
                m = re.match(r"\[(\d+)\]\.?", rest)
                if not m or int(m.group(1)) >= len(node.value):
                    break
                node, rest = node.value[int(m.group(1))], rest[m.end():]
                line = node.start_mark.line + 1
            elif isinstance(node, yaml.MappingNode):
                fits = [(k, v) for k, v in node.value
                        if isinstance(k.value, str) and rest.startswith(k.value)
                        and rest[len(k.value):len(k.value) + 1] in ("", ".", "[", ":", " ")]
                if not fits:
                    break
                k, node = max(fits, key=lambda kv: len(kv[0].value))
                line, rest = k.start_mark.line + 1, rest[len(k.value):].lstrip(".")
                if rest[:1] in (":", " "):
                    break
            else:
                break
        return line


def load_objects(path):
    f = open(path)
    objs = []
    loader = StrictLoader(f)
    try:
        while loader.check_node():
            node = loader.get_node()
            line = node.start_mark.line + 1
            data = loader.construct_document(node)
            if data is None:
                continue
            if not isinstance(data, dict):
                problem(f"{path}:{line}", f"a document must be a mapping, not {type(data).__name__}")
                continue
            for key in ("apiVersion", "kind", "metadata"):
                if key not in data:
                    problem(f"{path}:{line}", f"{key} is missing")
            if isinstance(data.get("metadata"), dict) and "name" not in data["metadata"]:
                problem(f"{path}:{line}", "metadata.name is missing")
            objs.append(Obj(path, node, data))
    except yaml.YAMLError as e:
        problem(path, f"not valid YAML: {e}")
    finally:
        loader.dispose()
        f.close()
    return objs


# ---------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate's strict JSON schemas, one dir per version).

SCHEMAS = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class KubeSchemas:
    def __init__(self, version):
        self.version = version
        self.dir = SCHEMAS / f"v{version}-local-strict"
        if not self.dir.is_dir():
            have = sorted(p.name for p in SCHEMAS.iterdir() if p.name.endswith("-local-strict"))
            sys.exit(f"check-deploy: kubernetes-validate has no strict schemas for {version} "
                     f"(it has {', '.join(have)})")
        defs = json.loads((self.dir / "_definitions.json").read_text())
        self.defs_id = defs["$id"]
        self.registry = referencing.Registry().with_resource(
            self.defs_id, referencing.Resource.from_contents(defs))
        self.cache = {}

    def validator(self, api_version, kind):
        key = (api_version, kind)
        if key not in self.cache:
            # apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            f = self.dir / f"{kind.lower()}-{group_version}.json"
            v = None
            if f.is_file():
                schema = json.loads(f.read_text())
                reg = self.registry.with_resource(
                    schema["$id"], referencing.Resource.from_contents(schema))
                v = jsonschema.Draft202012Validator(schema, registry=reg)
            self.cache[key] = v
        return self.cache[key]

    def with_object_meta(self, schema):
        """A validator for a custom resource: its CRD schema, metadata as ObjectMeta."""
        schema = dict(schema)
        props = dict(schema.get("properties", {}))
        props["metadata"] = {"$ref": f"{self.defs_id}#/$defs/{OBJECT_META}"}
        schema["properties"] = props
        return jsonschema.Draft202012Validator(schema, registry=self.registry)


def schema_errors(validator, o):
    """Each error as `FILE:LINE KIND/NAME: field.path: message`, at the offending
    field's line (an unexpected key's own line)."""
    out = []
    for e in sorted(validator.iter_errors(o.data), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(e.absolute_path)
        msg = e.message
        if e.context:  # oneOf/anyOf: the branch that got furthest says the most
            msg = jsonschema.exceptions.best_match(e.context).message
        unexpected = re.findall(r"'([^']+)' (?:was|were) unexpected", msg) if e.validator == "additionalProperties" else []
        line = o.line_of(path + unexpected[:1])
        if len(msg) > 300:
            msg = msg[:300] + "..."
        out.append(o.at(f"{'.'.join(str(p) for p in path) or '(object)'}: {msg}", line))
    return out


def structural_to_jsonschema(s):
    """A CRD's openAPIV3Schema as JSON Schema. Close to it already; what differs: the
    API server drops fields a structural schema does not name (and kubectl's strict
    field validation reports them), so objects with properties get
    additionalProperties false unless x-kubernetes-preserve-unknown-fields; nullable
    becomes a null type; x-kubernetes-* are not JSON Schema."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {p: structural_to_jsonschema(sub) for p, sub in v.items()}
        elif k in ("items", "not") or (k == "additionalProperties" and isinstance(v, dict)):
            out[k] = structural_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [structural_to_jsonschema(x) for x in v]
        elif k.startswith("x-kubernetes-") or k == "nullable":
            continue
        else:
            out[k] = v
    if (s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("nullable") and "type" in s:
        out["type"] = [s["type"], "null"]
    return out


# ---------------------------------------------------------------------------
# Names and values the schemas do not check but the API server does.

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
KUBE_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete",
              "deletecollection", "impersonate", "bind", "escalate", "use", "approve",
              "sign", "*"}
# Resources the RBAC may name per API group (add what a new rule needs): a misspelt
# resource is otherwise granted nothing, silently.
KNOWN_RESOURCES = {
    "": {"pods", "pods/status", "pods/log", "events", "nodes", "nodes/status",
         "configmaps", "secrets", "services", "endpoints", "namespaces",
         "serviceaccounts"},
    "events.k8s.io": {"events"},
    "apps": {"daemonsets", "deployments"},
    "coordination.k8s.io": {"leases"},
}
BUILTIN_PRIORITY_CLASSES = {"system-node-critical", "system-cluster-critical"}


def qualified_key(k):
    """A label or annotation key: [prefix/]name."""
    prefix, _, name = k.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(QUALIFIED_NAME.match(name))


def check_metadata(o):
    md = o.data.get("metadata")
    if not isinstance(md, dict):
        return
    name = md.get("name")
    if isinstance(name, str):
        pattern, limit = (DNS_LABEL, 63) if o.kind in ("Namespace", "Service") else (DNS_SUBDOMAIN, 253)
        if o.kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            ok = bool(name) and "/" not in name and name not in (".", "..")
        else:
            ok = len(name) <= limit and bool(pattern.match(name))
        if not ok:
            problem(o.at("metadata.name"), f"{name!r} is not a valid {o.kind} name")
    ns = md.get("namespace")
    if isinstance(ns, str) and not DNS_LABEL.match(ns):
        problem(o.at("metadata.namespace"), f"{ns!r} is not a valid namespace name")
    for field in ("labels", "annotations"):
        for k, v in (md.get(field) or {}).items():
            if not qualified_key(str(k)):
                problem(o.at(f"metadata.{field}"), f"{k!r} is not a valid key")
            if field == "labels" and not (isinstance(v, str) and len(v) <= 63 and LABEL_VALUE.match(v)):
                problem(o.at(f"metadata.labels.{k}"), f"{v!r} is not a valid label value")


# ---------------------------------------------------------------------------
# NADs: the CNI config and trellis's annotations (docs/cni.md, sriov.md, dataplane.md).

CNI_VERSIONS = {"0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
# agent/src/kinds/mod.rs CNI_CONF_KEYS, kinds/sriov/conf.rs SRIOV_KEYS, kinds/vhostuser.rs VHOST_KEYS
CNI_CONF_KEYS = {"cniVersion", "name", "type", "capabilities", "ipam", "dns", "args",
                 "runtimeConfig", "prevResult"}
IN_PROCESS_KEYS = {
    "sriov": {"deviceID", "vlan", "vlanQoS", "vlanProto", "mac", "mtu", "spoofchk", "trust",
              "link_state", "min_tx_rate", "max_tx_rate", "logLevel", "logFile"},
    "vhostuser": {"deviceID", "containerSocketDir"},
}
# agent/src/config.rs: [nad_policy] defaults, for an agent.toml that does not set them.
DEFAULT_NAD_PLUGINS = ["bandwidth", "bridge", "dhcp", "firewall", "host-local", "ipvlan",
                       "macvlan", "ptp", "sbr", "sriov", "static", "tuning", "vhostuser",
                       "vlan", "whereabouts"]
DEFAULT_DENIED_KEYS = ["dataDir", "daemonSocketPath", "resolvConf", "device", "pciBusID",
                       "kernelpath", "log_file", "configuration_path", "kubeconfig",
                       "delegate", "delegates"]
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}$")
ACL_ANNOTATION = "trellis.dev/acl"
RESOURCE_ANNOTATION = "k8s.v1.cni.cncf.io/resourceName"
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"


def walk_keys(v, at):
    if isinstance(v, dict):
        for k, x in v.items():
            yield f"{at}.{k}", k
            yield from walk_keys(x, f"{at}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from walk_keys(x, f"{at}[{i}]")


def check_cni_config(o, text, policy):
    where = "spec.config"
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as e:
        problem(o.at(where), f"not JSON: {e}")
        return
    if not isinstance(conf, dict):
        problem(o.at(where), "must be a JSON object")
        return
    if conf.get("cniVersion") not in CNI_VERSIONS:
        problem(o.at(f"{where}.cniVersion"),
                f"{conf.get('cniVersion')!r} is not a CNI version ({', '.join(sorted(CNI_VERSIONS))})")
    name = conf.get("name", o.name)
    if not (isinstance(name, str) and NETWORK_NAME.match(name)):
        problem(o.at(f"{where}.name"), f"{name!r} is not a network name (alphanumeric, then alphanumerics, '_', '.', '-')")
    if "plugins" in conf:
        plugins = conf["plugins"]
        if not (isinstance(plugins, list) and plugins and all(isinstance(p, dict) for p in plugins)):
            problem(o.at(f"{where}.plugins"), "must be a non-empty list of objects")
            return
        listed = [(f"{where}.plugins[{i}]", p) for i, p in enumerate(plugins)]
    else:
        listed = [(where, conf)]
    for at, p in listed:
        t = p.get("type")
        if not isinstance(t, str) or not t:
            problem(o.at(f"{at}.type"), "is missing")
            continue
        types = [(f"{at}.type", t)]
        ipam = p.get("ipam")
        if isinstance(ipam, dict) and "type" in ipam:
            types.append((f"{at}.ipam.type", ipam["type"]))
        for field, ty in types:
            if "*" not in policy["plugins"] and ty not in policy["plugins"]:
                problem(o.at(field), f"{ty!r} is not a plugin NADs may use ([nad_policy] plugins: {', '.join(policy['plugins'])})")
        if t in IN_PROCESS_KEYS:
            for k in p:
                if k not in CNI_CONF_KEYS and k not in IN_PROCESS_KEYS[t]:
                    problem(o.at(f"{at}.{k}"), f"unknown field for type {t}")
        if "prevResult" in p:
            problem(o.at(f"{at}.prevResult"), "NADs may not set it")
        denied = {d.lower() for d in policy["denied_keys"]}
        for field, k in walk_keys(p, at):
            if k.lower() in denied:
                problem(o.at(field), f"NADs may not set {k!r} ([nad_policy] denied_keys)")
        if t == "sriov":
            vlan = p.get("vlan")
            if vlan is not None and not (isinstance(vlan, int) and 0 <= vlan <= 4094):
                problem(o.at(f"{at}.vlan"), f"{vlan!r} is not a VLAN (0-4094)")
            for k in ("spoofchk", "trust"):
                if k in p and p[k] not in ("on", "off"):
                    problem(o.at(f"{at}.{k}"), f"{p[k]!r}: \"on\" or \"off\"")


def check_acl(o, text):
    at = f"metadata.annotations.{ACL_ANNOTATION}"
    try:
        acl = json.loads(text)
    except json.JSONDecodeError as e:
        problem(o.at(at), f"not JSON: {e}")
        return
    if not isinstance(acl, dict):
        problem(o.at(at), "must be a JSON object")
        return
    for k in acl:
        if k not in ("default", "rules"):
            problem(o.at(f"{at}: {k}"), "unknown key (default, rules)")
    if acl.get("default", "allow") not in ("allow", "deny"):
        problem(o.at(f"{at}: default"), f"{acl['default']!r}: allow or deny")
    rules = acl.get("rules", [])
    if not isinstance(rules, list):
        problem(o.at(f"{at}: rules"), "must be a list")
        return
    for i, r in enumerate(rules):
        rat = f"{at}: rule {i}"
        if not isinstance(r, dict):
            problem(o.at(rat), "must be an object")
            continue
        for k in r:
            if k not in ("action", "cidr", "direction", "protocol", "ports"):
                problem(o.at(rat), f"unknown key {k!r} (action, cidr, direction, protocol, ports)")
        if r.get("action") not in ("allow", "deny"):
            problem(o.at(rat), f"action {r.get('action')!r}: allow or deny")
        net = None
        try:
            net = ipaddress.ip_network(str(r.get("cidr")), strict=True)
        except ValueError as e:
            problem(o.at(rat), f"cidr {r.get('cidr')!r}: {e}")
        if r.get("direction", "both") not in ("ingress", "egress", "both"):
            problem(o.at(rat), f"direction {r['direction']!r}: ingress, egress or both")
        proto = r.get("protocol", "any")
        if proto not in ("tcp", "udp", "sctp", "icmp", "icmpv6", "any"):
            problem(o.at(rat), f"protocol {proto!r}: tcp, udp, sctp, icmp, icmpv6 or any")
        if net is not None and (proto, net.version) in (("icmp", 6), ("icmpv6", 4)):
            problem(o.at(rat), f"protocol {proto} with an IPv{net.version} CIDR")
        if "ports" in r:
            if proto not in ("tcp", "udp", "sctp"):
                problem(o.at(rat), "ports need protocol tcp, udp or sctp")
            ports = r["ports"]
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", str(ports)) if not isinstance(ports, bool) else None
            if not m or int(m.group(1)) > 65535 or int(m.group(2) or 0) > 65535 \
                    or int(m.group(2) or m.group(1)) < int(m.group(1)):
                problem(o.at(rat), f"ports {ports!r}: a port or a range \"low-high\"")


# ---------------------------------------------------------------------------
# Pods and pod templates.


def pod_spec_of(o):
    if o.kind == "Pod":
        return o.data.get("spec") or {}, "spec"
    if o.kind in ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"):
        return ((o.data.get("spec") or {}).get("template") or {}).get("spec") or {}, "spec.template.spec"
    return None, None


def containers_of(spec, base):
    for field in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(field) or []):
            if isinstance(c, dict):
                yield f"{base}.{field}[{i}]", c


def parse_networks(value):
    """The networks annotation, comma or JSON form: [(namespace or None, name, iface)]."""
    value = value.strip()
    if value.startswith("["):
        out = []
        for e in json.loads(value):
            out.append((e.get("namespace"), e["name"], e.get("interface")))
        return out
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        ns, _, rest = item.rpartition("/")
        name, _, iface = rest.partition("@")
        out.append((ns or None, name, iface or None))
    return out


def check_pod_spec(o, objs, pools, consistent_set):
    spec, base = pod_spec_of(o)
    if spec is None:
        return
    volumes = {}
    for i, v in enumerate(spec.get("volumes") or []):
        n = v.get("name")
        if n in volumes:
            problem(o.at(f"{base}.volumes[{i}].name"), f"{n!r} given twice")
        if not (isinstance(n, str) and DNS_LABEL.match(n)):
            problem(o.at(f"{base}.volumes[{i}].name"), f"{n!r} is not a valid volume name")
        volumes[n] = v
    mounted = set()
    names = set()
    for at, c in containers_of(spec, base):
        n = c.get("name")
        if n in names:
            problem(o.at(f"{at}.name"), f"{n!r}: two containers of one name")
        names.add(n)
        if not (isinstance(n, str) and DNS_LABEL.match(n)):
            problem(o.at(f"{at}.name"), f"{n!r} is not a valid container name")
        paths = set()
        for j, m in enumerate(c.get("volumeMounts") or []):
            mat = f"{at}.volumeMounts[{j}]"
            if m.get("name") not in volumes:
                problem(o.at(f"{mat}.name"), f"no volume {m.get('name')!r} in {base}.volumes")
            mounted.add(m.get("name"))
            if m.get("mountPath") in paths:
                problem(o.at(f"{mat}.mountPath"), f"{m.get('mountPath')!r} mounted twice")
            paths.add(m.get("mountPath"))
        envs = set()
        for j, e in enumerate(c.get("env") or []):
            if e.get("name") in envs:
                problem(o.at(f"{at}.env[{j}].name"), f"{e.get('name')!r} given twice")
            envs.add(e.get("name"))
        port_names = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in port_names:
                problem(o.at(f"{at}.{probe}.httpGet.port"), f"{port!r} is no port name of the container")
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for field, d in (("requests", requests), ("limits", limits)):
            for rname, q in d.items():
                if not QUANTITY.match(str(q)):
                    problem(o.at(f"{at}.resources.{field}.{rname}"), f"{q!r} is not a quantity")
        for rname in set(requests) | set(limits):
            extended = "/" in rname and not rname.startswith("kubernetes.io/")
            if extended or rname.startswith("hugepages-"):
                if rname not in limits:
                    problem(o.at(f"{at}.resources.limits"), f"{rname} must be in limits (extended resources and hugepages are)")
                elif rname in requests and str(requests[rname]) != str(limits[rname]):
                    problem(o.at(f"{at}.resources"), f"{rname}: requests and limits must be equal")
            if extended and pools is not None and rname not in pools:
                problem(o.at(f"{at}.resources"), f"{rname} is not a pool of the device config ({', '.join(sorted(pools))})")
    for n in volumes:
        if n not in mounted:
            problem(o.at(f"{base}.volumes"), f"volume {n!r} is mounted by no container")
    ns = o.namespace
    for n, v in volumes.items():
        cm = v.get("configMap")
        if cm is None:
            continue
        target = find(objs, "ConfigMap", cm.get("name"), ns)
        if target is None:
            if consistent_set:
                problem(o.at(f"{base}.volumes.{n}.configMap.name"), f"no ConfigMap {cm.get('name')!r} in namespace {ns}")
            continue
        for item in cm.get("items") or []:
            if item.get("key") not in (target.data.get("data") or {}):
                problem(o.at(f"{base}.volumes.{n}.configMap.items"), f"ConfigMap {cm.get('name')} has no key {item.get('key')!r}")
    sa = spec.get("serviceAccountName")
    if sa and sa != "default" and consistent_set and find(objs, "ServiceAccount", sa, ns) is None:
        problem(o.at(f"{base}.serviceAccountName"), f"no ServiceAccount {sa!r} in namespace {ns}")
    pc = spec.get("priorityClassName")
    if pc and pc not in BUILTIN_PRIORITY_CLASSES and find(objs, "PriorityClass", pc, None) is None:
        problem(o.at(f"{base}.priorityClassName"), f"{pc!r} is no built-in priority class and not defined here")
    if o.kind == "Pod":
        ann = (o.data.get("metadata") or {}).get("annotations") or {}
        if NETWORKS_ANNOTATION in ann:
            at = f"metadata.annotations.{NETWORKS_ANNOTATION}"
            try:
                nets = parse_networks(ann[NETWORKS_ANNOTATION])
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                problem(o.at(at), f"not a networks annotation: {e}")
                nets = []
            ifaces = set()
            for nns, name, iface in nets:
                if (nns or ns) == ns and find(objs, "NetworkAttachmentDefinition", name, ns) is None:
                    problem(o.at(at), f"no NetworkAttachmentDefinition {name!r} in this file")
                if iface is not None:
                    if iface in ifaces or iface == "eth0" or len(iface) > 15 or re.search(r"[/:\s]", iface):
                        problem(o.at(at), f"interface {iface!r}: taken, over 15 bytes, or with '/', ':' or spaces")
                    ifaces.add(iface)


def find(objs, kind, name, namespace):
    for x in objs:
        if x.kind == kind and x.name == name and (namespace is None or x.namespace == namespace):
            return x
    return None


# ---------------------------------------------------------------------------
# The install: trellis.yaml's objects against each other.


def check_install_set(objs, expected_image):
    namespaces = {x.name for x in objs if x.kind == "Namespace"}
    crd_plurals = {}
    for x in objs:
        if x.kind == "CustomResourceDefinition":
            s = x.data.get("spec") or {}
            crd_plurals.setdefault(s.get("group"), set()).add((s.get("names") or {}).get("plural"))
    for x in objs:
        if x.namespace is not None and x.namespace not in namespaces:
            problem(x.at("metadata.namespace"), f"namespace {x.namespace!r} is not created here")
        if x.kind in ("ClusterRole", "Role"):
            for i, rule in enumerate(x.data.get("rules") or []):
                at = f"rules[{i}]"
                for verb in rule.get("verbs") or []:
                    if verb not in KUBE_VERBS:
                        problem(x.at(f"{at}.verbs"), f"{verb!r} is not a Kubernetes verb")
                for group in rule.get("apiGroups") or []:
                    known = KNOWN_RESOURCES.get(group, set()) | crd_plurals.get(group, set())
                    if not known:
                        problem(x.at(f"{at}.apiGroups"), f"{group!r}: an API group this check does not know (typo? else add it to KNOWN_RESOURCES)")
                        continue
                    for r in rule.get("resources") or []:
                        if r not in known:
                            problem(x.at(f"{at}.resources"), f"{r!r} is not a resource of API group {group!r} (typo? else add it to KNOWN_RESOURCES)")
        if x.kind in ("ClusterRoleBinding", "RoleBinding"):
            ref = x.data.get("roleRef") or {}
            if find(objs, ref.get("kind"), ref.get("name"), None) is None:
                problem(x.at("roleRef"), f"no {ref.get('kind')} {ref.get('name')!r} here")
            for i, s in enumerate(x.data.get("subjects") or []):
                if s.get("kind") == "ServiceAccount" and find(objs, "ServiceAccount", s.get("name"), s.get("namespace")) is None:
                    problem(x.at(f"subjects[{i}]"), f"no ServiceAccount {s.get('namespace')}/{s.get('name')} here")
        if x.kind == "DaemonSet":
            spec = x.data.get("spec") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items():
                if labels.get(k) != v:
                    problem(x.at("spec.selector.matchLabels"), f"{k}={v} is not a label of the pod template")
            for at, c in containers_of(pod_spec_of(x)[0], "spec.template.spec"):
                if c.get("image") != expected_image:
                    problem(x.at(f"{at}.image"), f"{c.get('image')!r}, not {expected_image!r} (what scripts/image.sh tags)")


def mount_of(pod_spec, container, path):
    """The volume and the path inside it that `path` of `container` is on: (volume,
    host path or None, configMap key or None); None when no mount holds it."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    if best is None:
        return None
    mp, m = best
    rest = path[len(mp):].lstrip("/")
    vol = next((v for v in pod_spec.get("volumes") or [] if v.get("name") == m.get("name")), None)
    if vol is None:
        return None
    host = None
    if "hostPath" in vol:
        host = posixpath.join(vol["hostPath"].get("path", ""), rest) if rest else vol["hostPath"].get("path", "")
        host = host.rstrip("/") or "/"
    key = rest if "configMap" in vol else None
    return vol, host, key


def arg_after(cmd, flag):
    for i, a in enumerate(cmd[:-1]):
        if a == flag:
            return cmd[i + 1]
    return None


def check_agent_config(ds, cm, agent_toml, device_cfg):
    """The agent's paths against the DaemonSet's mounts (docs/cni.md: the shim on the
    host reaches the socket; kubelet reaches the plugin sockets by the host's path)."""
    spec = pod_spec_of(ds)[0]
    base = "spec.template.spec"
    cm_data = cm.data.get("data") or {}
    agent = install = None
    for at, c in containers_of(spec, base):
        cmd = (c.get("command") or []) + (c.get("args") or [])
        if "agent" in cmd:
            agent = (at, c, cmd)
        if "install" in cmd:
            install = (at, c, cmd)
        cfg = arg_after(cmd, "--config")
        if cfg is not None:
            mt = mount_of(spec, c, cfg)
            if mt is None or mt[2] is None:
                problem(ds.at(f"{at}.command"), f"--config {cfg}: no ConfigMap mount holds it")
            elif mt[2] not in cm_data or (mt[0]["configMap"].get("name") != cm.name):
                problem(ds.at(f"{at}.command"), f"--config {cfg}: ConfigMap {mt[0]['configMap'].get('name')} has no key {mt[2]!r}")
    if agent is None:
        problem(ds.at(base), "no container runs `trellis agent`")
        return
    at, c, _ = agent

    def host_backed(path, what, same_path=False):
        mt = mount_of(spec, c, path)
        if mt is None or mt[1] is None:
            why = "" if same_path else " (it must outlive the container)"
            problem(ds.at(f"{at}.volumeMounts"), f"{what} {path}: not on a hostPath mount{why}")
        elif same_path and mt[1] != path.rstrip("/"):
            problem(ds.at(f"{at}.volumeMounts"), f"{what} {path}: is {mt[1]} on the host; it must be the same path there")

    host_backed(posixpath.dirname(agent_toml.get("socket", "/run/trellis/cni.sock")), "socket dir (the shim on the host connects to it)", True)
    host_backed(agent_toml.get("state_dir", "/var/lib/trellis"), "state_dir")
    if "cni_conf_dir" in agent_toml:
        host_backed(agent_toml["cni_conf_dir"], "cni_conf_dir")
    dp = agent_toml.get("dataplane") or {}
    if dp.get("enabled", True):
        host_backed(dp.get("bpffs_dir", "/sys/fs/bpf/trellis"), "[dataplane] bpffs_dir")
    host_backed(posixpath.dirname(agent_toml.get("pod_resources_socket", "/var/lib/kubelet/pod-resources/kubelet.sock")),
                "pod_resources_socket's dir (kubelet's)", True)
    if agent_toml.get("host_process") and not spec.get("hostPID"):
        problem(ds.at(f"{base}.hostPID"), "host_process is set in agent.toml: the pod needs hostPID: true")
    if not spec.get("hostNetwork"):
        problem(ds.at(f"{base}.hostNetwork"), "the agent needs the host's network namespace")
    nets = agent_toml.get("networks") or {}
    if nets.get("source") == "kubernetes" and not nets.get("node_name"):
        if "NODE_NAME" not in {e.get("name") for e in c.get("env") or []}:
            problem(ds.at(f"{at}.env"), "[networks] has no node_name: NODE_NAME must be set (downward API spec.nodeName)")
    listen = (agent_toml.get("metrics") or {}).get("listen", "127.0.0.1:9105")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        hg = (c.get(probe) or {}).get("httpGet")
        if not hg:
            continue
        if not listen:
            problem(ds.at(f"{at}.{probe}"), "[metrics] listen is empty: nothing serves the probe")
            continue
        host, _, port = listen.rpartition(":")
        if str(hg.get("port")) != port:
            problem(ds.at(f"{at}.{probe}.httpGet.port"), f"{hg.get('port')}: the agent listens on {listen} ([metrics] listen)")
        if host.strip("[]") in ("127.0.0.1", "::1", "localhost") and hg.get("host") not in ("127.0.0.1", "::1", "localhost"):
            problem(ds.at(f"{at}.{probe}.httpGet.host"), f"the agent listens on loopback ({listen}): the probe must go to it")
    devices = agent_toml.get("devices")
    if devices is not None:
        mt = mount_of(spec, c, devices.get("config", ""))
        if mt is None or mt[2] is None or mt[2] not in cm_data:
            problem(ds.at(f"{at}.volumeMounts"), f"[devices] config {devices.get('config')}: no key of ConfigMap {cm.name} mounted there")
        host_backed(devices.get("plugin_dir", "/var/lib/kubelet/device-plugins"), "[devices] plugin_dir (kubelet's)", True)
        for r in (device_cfg or {}).get("resourceList") or []:
            if r.get("deviceType") == "vhostUser":
                sels = r.get("selectors")
                for s in sels if isinstance(sels, list) else [sels or {}]:
                    for d in s.get("socketDirs") or []:
                        host_backed(d, f"vhostUser socketDirs of {r.get('resourceName')} (host paths: kubelet mounts them into pods)", True)
    if install is not None:
        iat, ic, icmd = install
        bin_dir = arg_after(icmd, "--cni-bin-dir")
        for path, what in ((bin_dir, "--cni-bin-dir"), (agent_toml.get("cni_conf_dir"), "cni_conf_dir")):
            if path is None:
                continue
            mt = mount_of(spec, ic, path)
            if mt is None or mt[1] is None:
                problem(ds.at(f"{iat}.volumeMounts"), f"{what} {path}: not a hostPath mount of the install container")


def pools_of(device_cfg, agent_toml):
    prefix = ((agent_toml or {}).get("devices") or {}).get("resource_prefix", "intel.com")
    return {f"{r.get('resourcePrefix', prefix)}/{r.get('resourceName')}"
            for r in (device_cfg or {}).get("resourceList") or [] if isinstance(r, dict)}


# ---------------------------------------------------------------------------
# trellis itself on the ConfigMap's files.


def run_trellis(trellis_bin, cm, cm_data, tmp):
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0", TRELLIS_LOG="warn")
    if not (os.path.isfile(trellis_bin) and os.access(trellis_bin, os.X_OK)):
        problem(cm.at(), f"{trellis_bin} is missing (build it: cargo build --workspace --bins; or set TRELLIS_BIN)")
        return
    conf_dir = os.path.join(tmp, "etc-trellis")
    os.makedirs(conf_dir)
    for key, text in cm_data.items():
        if key == "agent.toml":
            # The ConfigMap is mounted at /etc/trellis: the same files, here.
            text = text.replace("/etc/trellis/", conf_dir + "/")
        with open(os.path.join(conf_dir, key), "w") as f:
            f.write(text)
    sysfs = os.path.join(tmp, "sys")
    os.makedirs(os.path.join(sysfs, "bus/pci/devices"))
    agent_toml = os.path.join(conf_dir, "agent.toml")
    device_cfg = os.path.join(conf_dir, "device-config.json")
    runs = [("agent.toml", [trellis_bin, "check-config", "--config", agent_toml])]
    if "device-config.json" in cm_data:
        # Newer CLIs take the agent's config with a global --config and the pool
        # config with --device-config; older ones took the pool config as --config.
        help_text = subprocess.run([trellis_bin, "devices", "--help"], capture_output=True, text=True, env=env).stdout
        if "--device-config" in help_text:
            cmd = [trellis_bin, "devices", "--config", agent_toml, "--device-config", device_cfg]
        else:
            cmd = [trellis_bin, "devices", "--config", device_cfg]
        runs.append(("device-config.json", cmd + ["--sysfs-root", sysfs]))
    for key, cmd in runs:
        shown = " ".join(cmd).replace(tmp, "$TMP")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            msg = (r.stderr.strip() or r.stdout.strip()).replace(tmp, "$TMP")
            problem(cm.at(f"data.{key}"), f"`{shown}` failed:\n    " + msg.replace("\n", "\n    "))
        else:
            print(f"check-deploy: ok: {shown}")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-versions", required=True, help="e.g. '1.30.0 1.37.0'")
    ap.add_argument("--image", required=True, help="the image the DaemonSet must name")
    ap.add_argument("--trellis-bin", required=True)
    ap.add_argument("--no-binary", action="store_true", help="skip the runs of trellis")
    args = ap.parse_args()

    parts = sorted(f"deploy/parts/{p}" for p in os.listdir("deploy/parts") if p.endswith(".yaml"))
    examples = sorted(f"deploy/examples/{p}" for p in os.listdir("deploy/examples") if p.endswith(".yaml"))
    install = [o for p in parts for o in load_objects(p)]
    combined = load_objects("deploy/trellis.yaml")
    if [o.data for o in combined] != [o.data for o in install]:
        problem("deploy/trellis.yaml", "its objects are not deploy/parts' (run scripts/gen-deploy.sh)")
    # The NAD CRD is a file of its own: deleting trellis.yaml must not delete it
    # (and every NAD in the cluster with it).
    crd_file = load_objects("deploy/crd.yaml")
    if any(o.kind == "CustomResourceDefinition" for o in install):
        problem("deploy/parts", "holds a CustomResourceDefinition: it belongs in deploy/crd.yaml alone")
    example_sets = {p: load_objects(p) for p in examples}
    if PROBLEMS:  # the rest would only echo a file that does not parse
        return report(0, 0, [], [])
    everything = install + crd_file + [o for objs in example_sets.values() for o in objs]

    # The NAD CRD, from deploy/crd.yaml; its schema checks the NADs.
    crds = {}
    for o in crd_file:
        if o.kind == "CustomResourceDefinition":
            s = o.data.get("spec") or {}
            for v in s.get("versions") or []:
                schema = (v.get("schema") or {}).get("openAPIV3Schema")
                if schema is None:
                    problem(o.at(f"spec.versions.{v.get('name')}"), "has no openAPIV3Schema")
                    continue
                gv = f"{s.get('group')}/{v.get('name')}"
                crds[(gv, (s.get("names") or {}).get("kind"))] = structural_to_jsonschema(schema)

    # The agent's config, from the install's ConfigMap.
    cm = find(install, "ConfigMap", "trellis-config", "trellis-system")
    ds = find(install, "DaemonSet", "trellis", "trellis-system")
    cm_data, agent_toml, device_cfg = {}, None, None
    if cm is None or ds is None:
        problem("deploy/parts", "no ConfigMap trellis-system/trellis-config or DaemonSet trellis-system/trellis")
    else:
        cm_data = cm.data.get("data") or {}
        for key in ("agent.toml", "device-config.json"):
            if key not in cm_data:
                problem(cm.at("data"), f"no key {key}")
            elif not CONFIGMAP_KEY.match(key):
                problem(cm.at("data"), f"{key!r} is not a valid ConfigMap key")
        try:
            agent_toml = tomllib.loads(cm_data.get("agent.toml", ""))
        except tomllib.TOMLDecodeError as e:
            problem(cm.at("data.agent.toml"), f"not TOML: {e}")
        try:
            device_cfg = json.loads(cm_data.get("device-config.json", "{}"))
        except json.JSONDecodeError as e:
            problem(cm.at("data.device-config.json"), f"not JSON: {e}")
    policy_toml = (agent_toml or {}).get("nad_policy") or {}
    policy = {"plugins": policy_toml.get("plugins", DEFAULT_NAD_PLUGINS),
              "denied_keys": policy_toml.get("denied_keys", DEFAULT_DENIED_KEYS)}
    pools = pools_of(device_cfg, agent_toml) if device_cfg is not None else None

    # Schemas, for each Kubernetes version.
    versions = args.kube_versions.split()
    found = {}  # message -> versions
    for version in versions:
        ks = KubeSchemas(version)
        crd_validators = {k: ks.with_object_meta(s) for k, s in crds.items()}
        for o in everything:
            av, kind = o.data.get("apiVersion"), o.data.get("kind")
            if not isinstance(av, str) or not isinstance(kind, str):
                continue
            v = crd_validators.get((av, kind)) or ks.validator(av, kind)
            if v is None:
                msg = o.at(f"kind {kind}, apiVersion {av}: no such kind in Kubernetes or the CRDs here (misspelt?)", o.line)
                found.setdefault(msg, []).append(version)
                continue
            for e in schema_errors(v, o):
                found.setdefault(e, []).append(version)
    for msg, vs in found.items():
        # Said once when every version agrees, else with the versions it holds for.
        PROBLEMS.append(msg if len(vs) == len(versions) else f"{msg} (Kubernetes {', '.join(vs)})")

    for o in everything:
        check_metadata(o)
        if o.kind == "NetworkAttachmentDefinition":
            config = (o.data.get("spec") or {}).get("config")
            if isinstance(config, str):
                check_cni_config(o, config, policy)
            else:
                problem(o.at("spec.config"), "is missing (trellis needs the CNI config in the NAD)")
            ann = (o.data.get("metadata") or {}).get("annotations") or {}
            if isinstance(ann.get(ACL_ANNOTATION), str):
                check_acl(o, ann[ACL_ANNOTATION])
            rn = ann.get(RESOURCE_ANNOTATION)
            if rn is not None and pools is not None and rn not in pools:
                problem(o.at(f"metadata.annotations.{RESOURCE_ANNOTATION}"),
                        f"{rn!r} is not a pool of the device config ({', '.join(sorted(pools))})")
        if o.kind == "ConfigMap":
            for k in (o.data.get("data") or {}):
                if not CONFIGMAP_KEY.match(str(k)):
                    problem(o.at("data"), f"{k!r} is not a valid ConfigMap key")
    for o in install:
        check_pod_spec(o, install, None, True)
    for p, objs in example_sets.items():
        for o in objs:
            check_pod_spec(o, objs, pools, False)
    check_install_set(install + crd_file, args.image)
    if cm is not None and ds is not None and agent_toml is not None:
        check_agent_config(ds, cm, agent_toml, device_cfg)

    if cm is not None and "agent.toml" in cm_data and not args.no_binary:
        tmp = tempfile.mkdtemp(prefix="check-deploy.")
        try:
            run_trellis(args.trellis_bin, cm, cm_data, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return report(len(install), sum(len(x) for x in example_sets.values()), examples, versions, len(crds))


def report(n_install, n_examples, examples, versions, n_crds=0):
    if PROBLEMS:
        for p in PROBLEMS:
            print(f"ERROR {p}", file=sys.stderr)
        print(f"check-deploy: {len(PROBLEMS)} problem(s) in deploy/", file=sys.stderr)
        return 1
    print(f"check-deploy: ok: {n_install + n_examples} objects ({n_install} in deploy/trellis.yaml, "
          f"{n_examples} in {len(examples)} examples) against the strict schemas of Kubernetes "
          f"{', '.join(versions)} and {n_crds} CRD schema(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
