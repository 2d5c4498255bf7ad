//! Every behavioural difference between the hosts the filter runs in, in one place.

use serde::Deserialize;

/// The proxy-wasm host flavour, chosen by the `proxy` configuration field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proxy {
    /// Envoy: callouts go to a cluster name; header names arrive lower-cased.
    Envoy,
    /// nginx with Kong's ngx_wasm_module, and Kong: callouts go to `host:port`; header removal
    /// and replacement match names case-sensitively.
    NgxWasmModule,
}

impl Proxy {
    /// Some ngx_wasm_module builds were seen to remove and replace request headers by exact name,
    /// so a client's `X-User-Identifier` would survive removing `x-user-identifier` (the 0.6.0
    /// prerelease verified here matches case-insensitively). There every case variant present is
    /// removed, to be safe with any build; Envoy lower-cases all names, so removing or replacing
    /// the lower-case name is enough.
    pub fn scrub_needs_header_scan(self) -> bool {
        matches!(self, Proxy::NgxWasmModule)
    }

    /// Whether a callout may run while the request that made it goes on. Envoy delivers the
    /// answer to the context whatever the request did meanwhile. A real nginx + ngx_wasm_module
    /// dropped such a call ("ResponseHeaders returned PAUSE: local response expected"), so there
    /// a refresh pauses its one request (already routed by the cached user) until the answer.
    pub fn callouts_run_in_background(self) -> bool {
        matches!(self, Proxy::Envoy)
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
        assert!(!Proxy::Envoy.scrub_needs_header_scan());
        assert!(Proxy::NgxWasmModule.scrub_needs_header_scan());
        assert!(Proxy::Envoy.callouts_run_in_background());
        assert!(!Proxy::NgxWasmModule.callouts_run_in_background());
    }
}
