//! Every behavioural difference between the hosts the filter runs in, in one place.

use serde::{de, Deserialize, Deserializer};

/// The proxy-wasm host flavour, chosen by the `proxy` configuration field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// Envoy: callouts go to a cluster name; header names arrive lower-cased.
    Envoy,
    /// nginx with Kong's ngx_wasm_module, and Kong: callouts go to `host:port`; a context can
    /// only be resumed from its own callbacks.
    NgxWasmModule,
}

impl<'de> Deserialize<'de> for Proxy {
    /// Read as a string first: serde_json reports a derived enum given a number (`"proxy": 1`)
    /// as broken JSON, which names no field.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Proxy, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "envoy" => Ok(Proxy::Envoy),
            "ngx_wasm_module" => Ok(Proxy::NgxWasmModule),
            other => Err(de::Error::unknown_variant(
                other,
                &["envoy", "ngx_wasm_module"],
            )),
        }
    }
}

/// What a host can do, derived once from `proxy`: the engine branches on these, never on the
/// host's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// ngx_wasm_module keeps the client's spelling of header names. The 0.6.0 prerelease
    /// verified here removes and replaces them case-insensitively, but the filter does not rely
    /// on it: there every spelling present is removed by its own name. Envoy lower-cases all
    /// names, so removing or replacing the lower-case name is enough. (With `nginx_variable` set
    /// no header is touched at all.)
    pub scrub_needs_header_scan: bool,
    /// Whether a callout may run while the request that made it goes on. Envoy delivers the
    /// answer to the context whatever the request did meanwhile. A real nginx + ngx_wasm_module
    /// dropped such a call ("ResponseHeaders returned PAUSE: local response expected"), so
    /// there a refresh pauses its one request (already routed by the cached user) until the
    /// answer.
    pub callouts_run_in_background: bool,
    /// Whether a callout's answer can resume requests other than the one that made it
    /// (`proxy_set_effective_context`). Envoy: yes, so concurrent requests of one token wait
    /// for one call. ngx_wasm_module makes that call a no-op, so there they are routed with the
    /// fallback key instead of waiting.
    pub resumes_other_contexts: bool,
    /// Whether a header the filter sets can take part in route matching only after the route
    /// cache is cleared (Envoy's `clear_route_cache` foreign function; since 2024-10 header
    /// changes from Wasm no longer clear it). nginx matches locations before the filter runs.
    pub clears_route_cache: bool,
    /// Whether the host's `:path` is already percent-decoded. ngx_wasm_module builds it from
    /// nginx's `r->uri` (decoded, with `.`/`..` segments resolved and slashes merged) and the
    /// raw arguments (`ngx_proxy_wasm_maps_get_path`, 3bed2783; seen on the real nginx: a
    /// request for `/rooms/%21ab%2541:x/members` arrives as `/rooms/!ab%41:x/members`). Envoy
    /// passes the request's own path. The query is raw on both.
    pub path_is_decoded: bool,
}

impl Proxy {
    pub fn capabilities(self) -> Capabilities {
        let envoy = self == Proxy::Envoy;
        Capabilities {
            scrub_needs_header_scan: !envoy,
            callouts_run_in_background: envoy,
            resumes_other_contexts: envoy,
            clears_route_cache: envoy,
            path_is_decoded: !envoy,
        }
    }

    /// Checks `nginx_variable`: empty (the key goes into the header), or for ngx_wasm_module an
    /// nginx variable name (written through the `ngx.<name>` property).
    pub fn validate_variable(self, name: &str) -> Result<(), &'static str> {
        if name.is_empty() {
            return Ok(());
        }
        if self != Proxy::NgxWasmModule {
            return Err("is only for `\"proxy\": \"ngx_wasm_module\"` (nginx)");
        }
        let ok = name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && !name.starts_with("http_")
            && !name.starts_with("arg_");
        if ok {
            Ok(())
        } else {
            Err(
                "must be an nginx variable name of 1-64 [A-Za-z0-9_] (without `$`), \
                 not a built-in `http_*`/`arg_*` variable",
            )
        }
    }

    /// Checks the form of the whoami upstream for this host.
    pub fn validate_upstream(self, upstream: &str) -> Result<(), &'static str> {
        if upstream.is_empty() || !upstream.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err("must be non-empty, without spaces or control characters");
        }
        match self {
            // Envoy resolves the cluster name when the call is made.
            Proxy::Envoy => Ok(()),
            Proxy::NgxWasmModule => match upstream.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty()
                        && !port.is_empty()
                        && port.len() <= 5
                        && port.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    Ok(())
                }
                _ => Err("must be `host:port` for ngx_wasm_module"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        assert!(Proxy::Envoy.validate_upstream("synapse_whoami").is_ok());
        assert!(Proxy::Envoy.validate_upstream("").is_err());
        assert!(Proxy::Envoy.validate_upstream("a b").is_err());
        assert!(Proxy::NgxWasmModule
            .validate_upstream("127.0.0.1:8008")
            .is_ok());
        assert!(Proxy::NgxWasmModule
            .validate_upstream("synapse.internal:8008")
            .is_ok());
        assert!(Proxy::NgxWasmModule.validate_upstream("[::1]:8008").is_ok());
        assert!(Proxy::NgxWasmModule.validate_upstream("synapse").is_err());
        assert!(Proxy::NgxWasmModule.validate_upstream(":8008").is_err());
        assert!(Proxy::NgxWasmModule.validate_upstream("h:port").is_err());
    }

    #[test]
    fn only_ngx_needs_a_header_scan_and_a_paused_refresh() {
        let (envoy, ngx) = (
            Proxy::Envoy.capabilities(),
            Proxy::NgxWasmModule.capabilities(),
        );
        assert!(!envoy.scrub_needs_header_scan);
        assert!(ngx.scrub_needs_header_scan);
        assert!(envoy.callouts_run_in_background);
        assert!(!ngx.callouts_run_in_background);
        assert!(envoy.resumes_other_contexts);
        assert!(!ngx.resumes_other_contexts);
        assert!(envoy.clears_route_cache);
        assert!(!ngx.clears_route_cache);
        assert!(!envoy.path_is_decoded);
        assert!(ngx.path_is_decoded);
    }

    #[test]
    fn nginx_variables() {
        let ngx = Proxy::NgxWasmModule;
        assert!(ngx.validate_variable("").is_ok());
        assert!(ngx.validate_variable("msr_user").is_ok());
        assert!(Proxy::Envoy.validate_variable("").is_ok());
        assert!(Proxy::Envoy.validate_variable("msr_user").is_err());
        for bad in [
            "$msr",
            "a-b",
            "1a",
            "http_x_user_identifier",
            "arg_x",
            "a b",
        ] {
            assert!(ngx.validate_variable(bad).is_err(), "{bad}");
        }
        assert!(ngx.validate_variable(&"a".repeat(65)).is_err());
    }
}
