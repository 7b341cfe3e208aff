//! A readable summary of a policy, for `gateway check`.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{BackendSpec, Policy};

// === impl Policy ===

impl Policy {
    /// A multi-line, human-readable summary: listener, deployments, backends by priority group
    /// (lowest first), failover and circuit breaker settings, consumers. Secret references such as
    /// `env:NAME` are shown; secret values never are (they are not resolved here).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> std::fmt::Result {
        let gateway = &self.gateway;
        writeln!(out, "policy {}", self.source.name())?;
        writeln!(
            out,
            "gateway: listen {}, max body {}, shutdown grace {} s",
            gateway.listen,
            bytes(gateway.max_body_bytes),
            gateway.shutdown_grace_seconds
        )?;
        let listeners = [("gateway", &gateway.tls), ("admin", &self.admin.tls)];
        for (listener, tls) in listeners {
            if let Some(tls) = tls {
                writeln!(
                    out,
                    "{listener} tls: HTTP/2 and HTTP/1.1, certificate from {}, key from {}, re-read every {} s",
                    tls.certificate, tls.private_key, tls.reload_seconds
                )?;
            }
        }
        if let Some(ca_file) = &self.upstream.ca_file {
            writeln!(
                out,
                "upstream tls: trusts the CA certificates in {ca_file} besides the system's"
            )?;
        }
        if let Some(entra) = &gateway.entra {
            writeln!(
                out,
                "entra id tokens: tenant {}, audiences {}, keys from {}, clock skew {} s",
                entra.tenant,
                entra.audiences.join(", "),
                entra.authority,
                entra.clock_skew_seconds
            )?;
        }

        writeln!(out, "deployments ({}):", self.deployments.len())?;
        for deployment in &self.deployments {
            match &deployment.model {
                Some(model) if *model != deployment.name => {
                    writeln!(out, "  {} (model {model})", deployment.name)?
                }
                _ => writeln!(out, "  {}", deployment.name)?,
            }
        }

        let mut groups: BTreeMap<u32, Vec<&BackendSpec>> = BTreeMap::new();
        for backend in &self.backends {
            groups.entry(backend.priority).or_default().push(backend);
        }
        writeln!(
            out,
            "backends ({}) in {} priority group{}, lower priority first:",
            self.backends.len(),
            groups.len(),
            plural(groups.len())
        )?;
        for (priority, backends) in &groups {
            let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
            writeln!(
                out,
                "  priority {priority}: {} backend{}, total weight {total}",
                backends.len(),
                plural(backends.len())
            )?;
            for backend in backends {
                write_backend(out, backend)?;
            }
        }

        let failover = &self.failover;
        let statuses: Vec<String> = failover.on_status.iter().map(u16::to_string).collect();
        writeln!(
            out,
            "failover: up to {} attempts, deadline {} ms, response headers within {} ms, cooldown {} ms (max {} ms), on status {}",
            failover.max_attempts,
            failover.deadline_ms,
            failover.response_header_timeout_ms,
            failover.default_cooldown_ms,
            failover.max_cooldown_ms,
            if statuses.is_empty() {
                "none".to_owned()
            } else {
                statuses.join(", ")
            }
        )?;
        let circuit = &self.circuit;
        writeln!(
            out,
            "circuit: ejects a backend at {}% failures over {}+ attempts within {} s or {} connection failure{} in a row, for {} s growing to {} s, at most {}% of a priority group",
            circuit.failure_percentage,
            circuit.request_volume,
            circuit.interval_seconds,
            circuit.consecutive_failures,
            plural(circuit.consecutive_failures as usize),
            circuit.base_ejection_seconds,
            circuit.max_ejection_seconds,
            circuit.max_ejection_percent
        )?;

        writeln!(out, "consumers ({}):", self.consumers.len())?;
        for consumer in &self.consumers {
            let deployments = match &consumer.deployments {
                Some(names) if names.is_empty() => "none".to_owned(),
                Some(names) => names.join(", "),
                None => "all".to_owned(),
            };
            let mut tokens = String::new();
            for (n, what) in [
                (consumer.entra_app_ids.len(), "Entra ID app"),
                (consumer.entra_object_ids.len(), "Entra ID object"),
            ] {
                if n > 0 {
                    let _ = write!(tokens, ", {n} {what}{}", plural(n));
                }
            }
            writeln!(
                out,
                "  {}: {} key{}{tokens}, deployments: {deployments}",
                consumer.name,
                consumer.keys.len(),
                plural(consumer.keys.len())
            )?;
        }
        Ok(())
    }
}

fn write_backend(out: &mut String, backend: &BackendSpec) -> std::fmt::Result {
    writeln!(
        out,
        "    {} ({}) {}",
        backend.name,
        backend.region,
        backend.normalized_endpoint()
    )?;
    let mut details = vec![format!("weight {}", backend.weight)];
    details.push(
        match (&backend.api_key, &backend.bearer_token, &backend.entra) {
            (Some(reference), None, None) => format!("api-key from {reference}"),
            (None, Some(reference), None) => format!("bearer token from {reference}"),
            (None, None, Some(entra)) => format!("Entra ID token for {}", entra.scope()),
            _ => "credential misconfigured".to_owned(),
        },
    );
    details.extend(backend.tpm.map(|tpm| format!("tpm {tpm}")));
    details.extend(backend.rpm.map(|rpm| format!("rpm {rpm}")));
    details.extend((backend.reserved_for.iter().flatten()).map(|c| format!("reserved for {c}")));
    details.extend(
        backend
            .headroom
            .iter()
            .flat_map(|h| h.shares())
            .map(|(tier, share)| {
                format!(
                    "keeps {:.0}% from the {} tier",
                    share * 100.0,
                    tier.as_str()
                )
            }),
    );
    writeln!(out, "      {}", details.join(", "))?;
    let mappings: Vec<String> = backend
        .deployments
        .iter()
        .map(|(logical, own)| {
            if logical == own {
                logical.clone()
            } else {
                format!("{logical} -> {own}")
            }
        })
        .collect();
    writeln!(out, "      deployments: {}", mappings.join(", "))
}

fn bytes(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if n >= MIB && n % MIB == 0 {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n % KIB == 0 {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
