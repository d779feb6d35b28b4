"""The static configuration file of `turnout serve --config FILE`: YAML text -> Settings fields.

Design rule: sans-IO and part of the core (it imports only proxy.settings, proxy.errors and proxy.parse's
Checker): the caller reads the file and passes its text and directory; every error names its field path
(`listeners[1].tls.min_version: ...`), all errors of the file are reported at once, unknown keys are refused.
Whether certificate and key files exist and load is the TLS loader's part (proxy.dataplane.certs), which
reports with the same paths. The result holds only the keys the file sets, so flags can override them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os.path
from typing import Any

import yaml

from proxy.checker import Checker
from proxy.errors import FieldError, ValidationError
from proxy.placement import check_zone
from proxy.settings import Certificate, Limits, Listener, Timeouts, TlsConfig

TOP_FIELDS = {"listeners", "admin", "workers", "limits", "timeouts", "trusted_proxies", "access_log", "zone",
              "docker", "check_interval", "grpc_error_codes"}
LISTENER_FIELDS = {"name", "address", "tls", "protocols"}
TLS_FIELDS = {"certificates", "client_ca", "client_cert", "min_version"}
CERT_FIELDS = {"cert", "key"}
CLIENT_CERT_MODES = ("optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
# h2 is offered by ALPN on TLS listeners; h2c (prior knowledge: the client opens with the HTTP/2 preface) is
# taken on cleartext ones. HTTP/1.1 `Upgrade: h2c` is never honoured on either.
PROTOCOLS = ("http/1.1", "h2", "h2c")
# A zero retry buffer is meaningful (never buffer a body for a retry); every other limit must be >= 1.
LIMIT_MINIMUM = {"retry_buffer_bytes": 0}


def parse_address(text: str) -> tuple[str, int] | None:
    """HOST:PORT (IPv6 in brackets) -> (host, port); None when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_config(text: str, base_dir: str = ".") -> dict[str, Any]:
    """The Settings fields the file sets (keyword arguments of Settings, except `limits` and `timeouts`: the
    dicts of the Limits / Timeouts fields it sets, so a flag can override one field), or ValidationError.
    Relative file names are taken from `base_dir` (the file's directory)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValidationError([FieldError("", f"not valid YAML: {e}")]) from e
    c = Checker()
    top = c.mapping({} if doc is None else doc, "", TOP_FIELDS)
    out: dict[str, Any] = {}
    if top is None:
        c.raise_if_any()
        return out
    if "listeners" in top:
        listeners = _listeners(c, top["listeners"], base_dir)
        if listeners:
            out["listeners"] = listeners
            out["listen"] = listeners[0].address
    if "admin" in top:
        addr = _address(c, top["admin"], "admin")
        if addr is not None:
            out["admin"] = addr
    if "workers" in top:
        n = c.number(top["workers"], "workers", 1, 1024, integer=True)
        if n is not None:
            out["workers"] = int(n)
    if "limits" in top:
        limits = _fields(c, top["limits"], "limits", Limits)
        if limits is not None:
            out["limits"] = limits
    if "timeouts" in top:
        timeouts = _fields(c, top["timeouts"], "timeouts", Timeouts)
        if timeouts is not None:
            out["timeouts"] = timeouts
    if "trusted_proxies" in top:
        peers = c.string_list(top["trusted_proxies"], "trusted_proxies")
        for i, p in enumerate(peers or ()):
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                c.fail(f"trusted_proxies[{i}]", f"expected an IP address or CIDR, got {p!r}")
        if peers is not None:
            out["trusted_proxies"] = peers
    if "check_interval" in top:
        n = c.number(top["check_interval"], "check_interval", 1, 365 * 86400)
        if n is not None:
            out["check_interval"] = float(n)
    if "zone" in top:
        zone = check_zone(top["zone"], "zone", c.errors)
        if zone is not None:
            out["zone"] = zone
    if "docker" in top:
        engines = _engines(c, top["docker"])
        if engines is not None:
            out["docker_engines"] = engines
    if "grpc_error_codes" in top:
        codes = top["grpc_error_codes"]
        if not isinstance(codes, list):
            c.fail("grpc_error_codes", "expected a list of grpc-status numbers (0-16)")
        else:
            nums = [c.number(v, f"grpc_error_codes[{i}]", 1, 16, integer=True) for i, v in enumerate(codes)]
            out["grpc_error_codes"] = tuple(int(n) for n in nums if n is not None)
    if "access_log" in top:
        log = top["access_log"]
        if log is None:
            out["access_log"] = None
        else:
            path = c.string(log, "access_log", what='a path or "-"')
            if path is not None:
                out["access_log"] = path if path == "-" else os.path.join(base_dir, path)
    c.raise_if_any()
    return out


def _engines(c: Checker, value: object) -> tuple[tuple[str, str], ...] | None:
    """`docker: {engines: {ZONE: URL, ...}}`: one Docker engine per zone."""
    m = c.mapping(value, "docker", {"engines"})
    if m is None or "engines" not in m:
        if m is not None:
            c.fail("docker.engines", "required (a mapping of zone to engine URL, like eu-1a: unix:///run/a.sock)")
        return None
    engines = c.mapping(m["engines"], "docker.engines")
    if engines is None:
        return None
    out = []
    for zone, url in engines.items():
        path = f"docker.engines.{zone}"
        if check_zone(zone, path, c.errors) is None:
            continue
        text = c.string(url, path, what="an engine URL (unix:///path, tcp://host:port)")
        if text is not None and not text.startswith(("unix://", "tcp://", "ssh://", "http://", "https://")):
            c.fail(path, f"expected an engine URL (unix:///path, tcp://host:port), got {text!r}")
        elif text is not None:
            out.append((zone, text))
    if not out and not c.errors:
        c.fail("docker.engines", "expected at least one zone: engine URL")
    return tuple(out)


def _address(c: Checker, value: object, path: str) -> tuple[str, int] | None:
    text = c.string(value, path, what="HOST:PORT")
    if text is None:
        return None
    addr = parse_address(text)
    if addr is None:
        c.fail(path, f"expected HOST:PORT, got {text!r}")
    return addr


def _listeners(c: Checker, value: object, base_dir: str) -> tuple[Listener, ...]:
    if not isinstance(value, list) or not value:
        c.fail("listeners", "expected a non-empty list of listeners")
        return ()
    out: list[Listener] = []
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for i, item in enumerate(value):
        path = f"listeners[{i}]"
        m = c.mapping(item, path, LISTENER_FIELDS)
        if m is None:
            continue
        if "address" not in m:
            c.fail(f"{path}.address", "required (HOST:PORT)")
            continue
        addr = _address(c, m["address"], f"{path}.address")
        name = c.string(m.get("name", f"listener{i}"), f"{path}.name")
        tls = _tls(c, m["tls"], f"{path}.tls", base_dir) if m.get("tls") is not None else None
        protocols: tuple[str, ...] = ("http/1.1",)
        if "protocols" in m:
            protocols = c.string_list(m["protocols"], f"{path}.protocols") or ()
            for j, p in enumerate(protocols):
                if p not in PROTOCOLS:
                    c.fail(f"{path}.protocols[{j}]", f"expected one of: {', '.join(PROTOCOLS)}, got {p!r}")
                elif p == "h2" and tls is None and "tls" not in m:
                    c.fail(f"{path}.protocols[{j}]", "h2 needs tls (cleartext HTTP/2 is h2c)")
                elif p == "h2c" and "tls" in m:
                    c.fail(f"{path}.protocols[{j}]", "h2c is cleartext HTTP/2; a tls listener offers h2")
            if not protocols:
                c.fail(f"{path}.protocols", "expected at least one protocol")
        if name is not None and name in names:
            c.fail(f"{path}.name", f"{name!r} is also the name of listeners[{names[name]}]")
        if addr is not None and addr in addresses:
            c.fail(f"{path}.address", f"listeners[{addresses[addr]}] listens there too")
        if name is not None:
            names.setdefault(name, i)
        if addr is not None:
            addresses.setdefault(addr, i)
        if name is None or addr is None:
            continue
        out.append(Listener(name=name, address=addr, tls=tls, protocols=protocols))
    return tuple(out)


def _tls(c: Checker, value: object, path: str, base_dir: str) -> TlsConfig | None:
    m = c.mapping(value, path, TLS_FIELDS)
    if m is None:
        return None
    certs: list[Certificate] = []
    raw = m.get("certificates")
    if not isinstance(raw, list) or not raw:
        c.fail(f"{path}.certificates", "expected a non-empty list of {cert: FILE, key: FILE}")
    else:
        for j, item in enumerate(raw):
            cp = f"{path}.certificates[{j}]"
            pair = c.mapping(item, cp, CERT_FIELDS)
            if pair is None:
                continue
            files = []
            for k in ("cert", "key"):
                if k not in pair:
                    c.fail(f"{cp}.{k}", "required (a PEM file)")
                    continue
                f = c.string(pair[k], f"{cp}.{k}", what="a file name")
                if f is not None:
                    files.append(os.path.join(base_dir, f))
            if len(files) == 2:
                certs.append(Certificate(cert=files[0], key=files[1]))
    client_ca = None
    if m.get("client_ca") is not None:
        ca = c.string(m["client_ca"], f"{path}.client_ca", what="a file name")
        client_ca = os.path.join(base_dir, ca) if ca is not None else None
    mode = "optional"
    if "client_cert" in m:
        text = c.string(m["client_cert"], f"{path}.client_cert", what="optional or required")
        if text is not None and text not in CLIENT_CERT_MODES:
            c.fail(f"{path}.client_cert", f"expected optional or required, got {text!r}")
        elif text is not None:
            mode = text
        if "client_ca" not in m:
            c.fail(f"{path}.client_cert", "needs client_ca (the CA that verifies client certificates)")
    version = "1.2"
    if "min_version" in m:
        v = m["min_version"]
        text = str(v) if isinstance(v, float | str) and not isinstance(v, bool) else None
        if text in ("1.0", "1.1", "1"):
            c.fail(f"{path}.min_version", f"TLS {text} is refused (insecure); expected 1.2 or 1.3")
        elif text not in TLS_VERSIONS:
            c.fail(f"{path}.min_version", f"expected \"1.2\" or \"1.3\", got {v!r}")
        else:
            version = text
    if not certs:
        return None
    return TlsConfig(certificates=tuple(certs), client_ca=client_ca, client_cert=mode, min_version=version)


def _fields(c: Checker, value: object, path: str, cls: type[Limits] | type[Timeouts]) -> dict[str, Any] | None:
    names = {f.name for f in dataclasses.fields(cls)}
    m = c.mapping(value, path, names)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    for k, v in m.items():
        if cls is Limits:
            n = c.number(v, f"{path}.{k}", LIMIT_MINIMUM.get(k, 1), integer=True)
        elif k == "shutdown_grace":  # 0 is meaningful: stop at once
            n = c.number(v, f"{path}.{k}", 0)
        else:
            n = c.number(v, f"{path}.{k}", 0)
            if n == 0:
                c.fail(f"{path}.{k}", "expected a number of seconds > 0, got 0")
                n = None
        if n is not None:
            kw[k] = int(n) if cls is Limits else float(n)
    if cls is Limits:
        lim = Limits(**kw)
        if lim.low_water > lim.high_water:
            c.fail(f"{path}.low_water", f"must not exceed high_water ({lim.high_water}), got {lim.low_water}")
    return kw
