//! VMs through libvirt (the `virt` crate), per-domain calls. libvirt calls are blocking
//! and can hang (migration, shutdown), so the connection lives on its own thread and
//! every poll has a deadline: a hung poll costs this poll's VM readings, never the node.

use crate::source::{OwnerMeta, Reading, SourceError};
use meterflow_types::Counters;
use std::sync::mpsc;
use std::time::Duration;
use virt::connect::Connect;
use virt::domain::Domain;

pub const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";
pub const METERFLOW_NS: &str = "https://meterflow.dev/xmlns/instance/1";

const METADATA_ELEMENT: i32 = 2;
const MEMORY_STAT_UNUSED: u32 = 4;
const MEMORY_STAT_AVAILABLE: u32 = 5;

pub type PollResult = (Vec<Reading>, Vec<SourceError>);

/// Handle to the libvirt thread.
pub struct LibvirtSource {
    uri: String,
    tx: mpsc::Sender<tokio::sync::oneshot::Sender<Result<PollResult, String>>>,
    deadline: Duration,
}

impl LibvirtSource {
    pub fn open(uri: &str, deadline: Duration) -> anyhow::Result<LibvirtSource> {
        // libvirt prints every error to stderr by default; ours are returned and logged once.
        virt::error::clear_error_callback();
        let conn = Connect::open_read_only(Some(uri))
            .map_err(|e| anyhow::anyhow!("opening libvirt {uri}: {e}"))?;
        let (tx, rx) = mpsc::channel::<tokio::sync::oneshot::Sender<Result<PollResult, String>>>();
        let hv = uri.split(':').next().unwrap_or("libvirt").to_string();
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                let conn = conn;
                while let Ok(reply) = rx.recv() {
                    let _ = reply.send(poll_connection(&conn, &hv));
                }
            })?;
        Ok(LibvirtSource {
            uri: uri.to_string(),
            tx,
            deadline,
        })
    }

    pub async fn poll(&self) -> Result<PollResult, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(reply)
            .map_err(|_| "libvirt thread is gone".to_string())?;
        match tokio::time::timeout(self.deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("libvirt thread dropped the request".into()),
            Err(_) => Err(format!(
                "libvirt poll of {} exceeded its {:?} deadline",
                self.uri, self.deadline
            )),
        }
    }
}

fn poll_connection(conn: &Connect, hypervisor: &str) -> Result<PollResult, String> {
    let domains = conn
        .list_all_domains(0)
        .map_err(|e| format!("listing domains: {e}"))?;
    let mut readings = Vec::with_capacity(domains.len());
    let mut errors = Vec::new();
    for d in &domains {
        match read_domain(d, hypervisor) {
            Ok(r) => readings.push(r),
            Err(reason) => errors.push(SourceError {
                instance: d.get_uuid_string().unwrap_or_default(),
                reason,
            }),
        }
    }
    Ok((readings, errors))
}

fn state_name(s: u32) -> &'static str {
    match s {
        1 => "running",
        2 => "blocked",
        3 => "paused",
        4 => "shutdown",
        5 => "shutoff",
        6 => "crashed",
        7 => "pmsuspended",
        _ => "unknown",
    }
}

fn read_domain(d: &Domain, hypervisor: &str) -> Result<Reading, String> {
    let uuid = d.get_uuid_string().map_err(|e| format!("uuid: {e}"))?;
    let name = d.get_name().map_err(|e| format!("name: {e}"))?;
    let info = d.get_info().map_err(|e| format!("info: {e}"))?;
    let state = state_name(info.state).to_string();
    let xml = d.get_xml_desc(0).map_err(|e| format!("xml: {e}"))?;
    let mut counters = Counters {
        cpu_time_ns: i64::try_from(info.cpu_time).map_err(|_| "cpu time overflows".to_string())?,
        ..Default::default()
    };
    let running = info.state == 1 || info.state == 3;
    let mut memory_used_bytes = None;
    if running {
        for dev in targets(&xml, "interface") {
            let s = d
                .interface_stats(&dev)
                .map_err(|e| format!("interface {dev}: {e}"))?;
            counters.net_rx_bytes += s.rx_bytes;
            counters.net_tx_bytes += s.tx_bytes;
        }
        for dev in targets(&xml, "disk") {
            let s = d
                .get_block_stats(&dev)
                .map_err(|e| format!("disk {dev}: {e}"))?;
            counters.disk_read_bytes += s.rd_bytes.max(0);
            counters.disk_write_bytes += s.wr_bytes.max(0);
        }
        // Balloon stats when the guest reports them; absent otherwise, never invented.
        if let Ok(stats) = d.memory_stats(0) {
            let get = |tag| stats.iter().find(|s| s.tag == tag).map(|s| s.val as i64);
            if let (Some(avail), Some(unused)) =
                (get(MEMORY_STAT_AVAILABLE), get(MEMORY_STAT_UNUSED))
            {
                memory_used_bytes = Some((avail - unused).max(0) * 1024);
            }
        }
    }
    let meta = d.get_metadata(METADATA_ELEMENT, Some(METERFLOW_NS), 0).ok();
    let nova = d.get_metadata(METADATA_ELEMENT, Some(NOVA_NS), 0).ok();
    let (owner, flavor) = owner_from_metadata(meta.as_deref(), nova.as_deref());
    Ok(Reading {
        instance_id: uuid,
        name,
        kind: "vm",
        hypervisor: hypervisor.to_string(),
        incarnation: d
            .get_id()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "off".into()),
        state,
        counters,
        vcpu_millis: info.nr_virt_cpu as i64 * 1000,
        memory_alloc_bytes: (info.memory as i64) * 1024,
        memory_used_bytes,
        flavor,
        owner,
    })
}

/// `<target dev='X'/>` of every `<interface>` or `<disk>` element in a domain XML.
pub fn targets(xml: &str, element: &str) -> Vec<String> {
    let open = format!("<{element} ");
    let close = format!("</{element}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let body = &rest[i..];
        let end = body.find(&close).unwrap_or(body.len());
        let section = &body[..end];
        if let Some(t) = section.find("<target ") {
            if let Some(dev) = attr(&section[t..], "dev") {
                out.push(dev);
            }
        }
        rest = &body[end.min(body.len())..];
        if end == body.len() {
            break;
        }
    }
    out
}

/// Value of `name="…"` or `name='…'` in the first tag of `s`.
pub fn attr(s: &str, name: &str) -> Option<String> {
    let tag_end = s.find('>').unwrap_or(s.len());
    let tag = &s[..tag_end];
    for q in ['"', '\''] {
        let pat = format!(" {name}={q}");
        if let Some(i) = tag.find(&pat) {
            let v = &tag[i + pat.len()..];
            return v.find(q).map(|j| v[..j].to_string());
        }
    }
    None
}

fn element_text(s: &str, local: &str) -> Option<(String, String)> {
    // finds <prefix:local ...>text</…> or <local ...>text</…>; returns (tag, text)
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        let t = &rest[i + 1..];
        let name_end = t
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(t.len());
        let name = &t[..name_end];
        if name.rsplit(':').next() == Some(local) {
            let tag_end = t.find('>')?;
            let tag = format!("<{}", &t[..tag_end]);
            let text = &t[tag_end + 1..];
            let text = text[..text.find('<').unwrap_or(text.len())]
                .trim()
                .to_string();
            return Some((tag, text));
        }
        rest = t;
    }
    None
}

/// Owner and flavor from domain metadata. The meterflow element
/// `<instance xmlns="https://meterflow.dev/xmlns/instance/1" user=".." entity=".." project=".." flavor=".."/>`
/// wins; otherwise Nova's `<nova:owner>` gives user (uuid) and project (uuid, also the
/// billing entity) and `<nova:flavor name>` the flavor.
pub fn owner_from_metadata(
    meterflow: Option<&str>,
    nova: Option<&str>,
) -> (Option<OwnerMeta>, Option<String>) {
    if let Some(m) = meterflow {
        let m = m.trim_start();
        if let (Some(user), Some(entity)) = (attr(m, "user"), attr(m, "entity")) {
            return (
                Some(OwnerMeta {
                    user_id: user,
                    entity_id: entity,
                    project: attr(m, "project"),
                }),
                attr(m, "flavor"),
            );
        }
    }
    if let Some(n) = nova {
        let flavor = element_text(n, "flavor").and_then(|(tag, _)| attr(&tag, "name"));
        let user = element_text(n, "user")
            .and_then(|(tag, text)| attr(&tag, "uuid").or(Some(text)).filter(|s| !s.is_empty()));
        let project = element_text(n, "project")
            .and_then(|(tag, text)| attr(&tag, "uuid").or(Some(text)).filter(|s| !s.is_empty()));
        if let (Some(u), Some(p)) = (user, project) {
            return (
                Some(OwnerMeta {
                    user_id: u,
                    entity_id: p.clone(),
                    project: Some(p),
                }),
                flavor,
            );
        }
        return (None, flavor);
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_interface_and_disk_targets() {
        let xml = r#"<domain><devices>
            <disk type='file' device='disk'><source file='/x'/><target dev='vda' bus='virtio'/></disk>
            <interface type='network'><mac address='aa'/><target dev="vnet3"/></interface>
            <interface type='network'><mac address='bb'/></interface>
        </devices></domain>"#;
        assert_eq!(targets(xml, "disk"), vec!["vda"]);
        assert_eq!(targets(xml, "interface"), vec!["vnet3"]);
    }

    #[test]
    fn owner_from_meterflow_then_nova_metadata() {
        let mf = r#"<instance xmlns="https://meterflow.dev/xmlns/instance/1" user="alice" entity="acme" project="web"/>"#;
        let (o, _) = owner_from_metadata(Some(mf), None);
        assert_eq!(
            o,
            Some(OwnerMeta {
                user_id: "alice".into(),
                entity_id: "acme".into(),
                project: Some("web".into())
            })
        );
        let nova = r#"<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
            <nova:flavor name="m1.small"><nova:memory>512</nova:memory></nova:flavor>
            <nova:owner><nova:user uuid="u-1">admin</nova:user><nova:project uuid="p-9">demo</nova:project></nova:owner>
          </nova:instance>"#;
        let (o, f) = owner_from_metadata(None, Some(nova));
        assert_eq!(
            o,
            Some(OwnerMeta {
                user_id: "u-1".into(),
                entity_id: "p-9".into(),
                project: Some("p-9".into())
            })
        );
        assert_eq!(f.as_deref(), Some("m1.small"));
        assert_eq!(owner_from_metadata(None, None), (None, None));
    }
}
