//! VMs through libvirt (the `virt` crate), per-domain calls.
//!
//! libvirt calls block and can hang (a domain stuck in migration or shutdown, a wedged
//! QEMU monitor). Every call runs on a small pool of worker threads and has its own
//! deadline (`libvirt_call_timeout`): a domain whose call overruns is reported as an
//! error for this poll, its worker is written off and replaced, and the domain is skipped
//! in later polls until the stuck call returns, so one hung domain never costs the
//! others a poll and never piles up threads.

use crate::source::{OwnerMeta, Reading, SourceError};
use meterflow_types::{Counters, Labels};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;

pub const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";
pub const METERFLOW_NS: &str = "https://meterflow.dev/xmlns/instance/1";

const METADATA_ELEMENT: i32 = 2;
const MEMORY_STAT_UNUSED: u32 = 4;
const MEMORY_STAT_AVAILABLE: u32 = 5;
/// Worker threads kept for libvirt calls.
const WORKERS: usize = 4;
/// Written-off (hung) workers tolerated before no more replacements are started.
const MAX_HUNG: usize = 64;

pub type PollResult = (Vec<Reading>, Vec<SourceError>);

/// A unit of work; returns true if its worker was written off meanwhile (and must go).
type Job = Box<dyn FnOnce() -> bool + Send>;

/// Worker threads for blocking libvirt calls.
struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Workers alive (serving, or stuck in a written-off call).
    alive: Arc<AtomicUsize>,
}

impl Pool {
    fn new() -> std::io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let pool = Pool {
            tx: Mutex::new(tx),
            rx: Arc::new(Mutex::new(rx)),
            alive: Arc::new(AtomicUsize::new(0)),
        };
        for _ in 0..WORKERS {
            pool.spawn()?;
        }
        Ok(pool)
    }

    fn spawn(&self) -> std::io::Result<()> {
        let rx = self.rx.clone();
        let alive = self.alive.clone();
        alive.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => break,
                    };
                    let Ok(job) = job else { break };
                    if job() {
                        break; // written off: its replacement already serves
                    }
                }
                alive.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.alive.fetch_sub(1, Ordering::SeqCst);
        }
        spawned.map(|_| ())
    }

    fn submit(&self, job: Job) -> Result<(), String> {
        self.tx
            .lock()
            .map_err(|_| "libvirt pool poisoned".to_string())?
            .send(job)
            .map_err(|_| "libvirt workers are gone".to_string())
    }

    /// A worker is stuck in a call: start a replacement (bounded).
    fn replace(&self) {
        if self.alive.load(Ordering::SeqCst) < WORKERS + MAX_HUNG {
            if let Err(e) = self.spawn() {
                tracing::error!(error = %e, "could not start a libvirt worker");
            }
        }
    }
}

struct CallState<T> {
    started: Option<Instant>,
    result: Option<T>,
    written_off: bool,
}

/// One call: when it started on a worker, and what it returned. The state sits under
/// one lock so "finished" and "written off" can never both happen.
struct Call<T> {
    state: Mutex<CallState<T>>,
}

enum Outcome<T> {
    Done(T),
    Pending,
    /// Overran its deadline: written off now.
    Overran,
}

impl<T: Send + 'static> Call<T> {
    fn run(pool: &Pool, f: impl FnOnce() -> T + Send + 'static) -> Result<Arc<Call<T>>, String> {
        let call = Arc::new(Call {
            state: Mutex::new(CallState {
                started: None,
                result: None,
                written_off: false,
            }),
        });
        let c = call.clone();
        pool.submit(Box::new(move || {
            if let Ok(mut s) = c.state.lock() {
                s.started = Some(Instant::now());
            }
            let r = f();
            match c.state.lock() {
                Ok(mut s) if !s.written_off => {
                    s.result = Some(r);
                    false
                }
                _ => true,
            }
        }))?;
        Ok(call)
    }

    /// The result if finished; otherwise write the call off if it has run for longer
    /// than `timeout` (the caller then replaces its worker).
    fn check(&self, timeout: Duration) -> Outcome<T> {
        let Ok(mut s) = self.state.lock() else {
            return Outcome::Overran;
        };
        if let Some(r) = s.result.take() {
            return Outcome::Done(r);
        }
        if s.started.is_some_and(|t| t.elapsed() > timeout) {
            s.written_off = true;
            return Outcome::Overran;
        }
        Outcome::Pending
    }
}

/// Faults injected by tests: calls for these domain names sleep this long first.
pub type Hangs = Arc<Mutex<HashMap<String, Duration>>>;

/// The libvirt source of one node.
pub struct LibvirtSource {
    uri: String,
    hypervisor: String,
    conn: Connect,
    pool: Pool,
    call_timeout: Duration,
    poll_deadline: Duration,
    /// Domains (uuid) whose last call has not returned: skipped until it does.
    hung: Arc<Mutex<HashMap<String, Instant>>>,
    hangs: Hangs,
}

impl LibvirtSource {
    pub fn open(
        uri: &str,
        call_timeout: Duration,
        poll_deadline: Duration,
    ) -> anyhow::Result<LibvirtSource> {
        // libvirt prints every error to stderr by default; ours are returned and logged once.
        virt::error::clear_error_callback();
        let conn = Connect::open_read_only(Some(uri))
            .map_err(|e| anyhow::anyhow!("opening libvirt {uri}: {e}"))?;
        Ok(LibvirtSource {
            uri: uri.to_string(),
            hypervisor: uri.split(':').next().unwrap_or("libvirt").to_string(),
            conn,
            pool: Pool::new()?,
            call_timeout,
            poll_deadline: poll_deadline.max(call_timeout),
            hung: Arc::default(),
            hangs: Arc::default(),
        })
    }

    /// Fault injection for tests: make every read of domain `name` take `d` first.
    #[doc(hidden)]
    pub fn inject_hang(&self, name: &str, d: Duration) {
        if let Ok(mut h) = self.hangs.lock() {
            h.insert(name.to_string(), d);
        }
    }

    /// Worker threads alive, including ones stuck in a hung call.
    pub fn threads(&self) -> usize {
        self.pool.alive.load(Ordering::SeqCst)
    }

    pub async fn poll(&self) -> Result<PollResult, String> {
        let conn = self.conn.clone();
        let list = Call::run(&self.pool, move || {
            conn.list_all_domains(0)
                .map_err(|e| format!("listing domains: {e}"))
        })?;
        let domains = loop {
            match list.check(self.call_timeout) {
                Outcome::Done(r) => break r?,
                Outcome::Overran => {
                    self.pool.replace();
                    return Err(format!(
                        "listing the domains of {} exceeded its {:?} deadline",
                        self.uri, self.call_timeout
                    ));
                }
                Outcome::Pending => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let begun = Instant::now();
        let mut readings = Vec::with_capacity(domains.len());
        let mut errors = Vec::new();
        let mut calls = Vec::with_capacity(domains.len());
        for d in domains {
            // local to the handle: no RPC, cannot hang
            let uuid = d.get_uuid_string().unwrap_or_default();
            let stuck = self.hung.lock().ok().and_then(|h| h.get(&uuid).copied());
            if let Some(since) = stuck {
                errors.push(SourceError {
                    instance: uuid,
                    reason: format!(
                        "skipped: an earlier libvirt call for it has not returned ({}s)",
                        since.elapsed().as_secs()
                    ),
                });
                continue;
            }
            let hv = self.hypervisor.clone();
            let hangs = self.hangs.clone();
            let hung = self.hung.clone();
            let id = uuid.clone();
            let call = Call::run(&self.pool, move || {
                let name = d.get_name().unwrap_or_default();
                let pause = hangs.lock().ok().and_then(|h| h.get(&name).copied());
                if let Some(p) = pause {
                    std::thread::sleep(p);
                }
                let r = read_domain(&d, &hv);
                if let Ok(mut h) = hung.lock() {
                    h.remove(&id);
                }
                r
            })?;
            calls.push((uuid, call));
        }
        while !calls.is_empty() {
            let mut waiting = Vec::with_capacity(calls.len());
            for (uuid, call) in calls {
                match call.check(self.call_timeout) {
                    Outcome::Done(Ok(r)) => readings.push(r),
                    Outcome::Done(Err(reason)) => errors.push(SourceError {
                        instance: uuid,
                        reason,
                    }),
                    Outcome::Overran => {
                        if let Ok(mut h) = self.hung.lock() {
                            h.insert(uuid.clone(), Instant::now());
                        }
                        self.pool.replace();
                        errors.push(SourceError {
                            instance: uuid,
                            reason: format!(
                                "libvirt call exceeded its {:?} deadline",
                                self.call_timeout
                            ),
                        });
                    }
                    Outcome::Pending if begun.elapsed() > self.poll_deadline => {
                        errors.push(SourceError {
                            instance: uuid,
                            reason: format!(
                                "not read within the poll's {:?} deadline (workers busy)",
                                self.poll_deadline
                            ),
                        });
                    }
                    Outcome::Pending => waiting.push((uuid, call)),
                }
            }
            calls = waiting;
            if !calls.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok((readings, errors))
    }
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
    let labels = meta
        .as_deref()
        .map(labels_from_metadata)
        .unwrap_or_default();
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
        site: meta.as_deref().and_then(|m| attr(m.trim_start(), "site")),
        owner,
        labels,
    })
}

/// `<label name="team">web</label>` (or `value="web"`) children of the meterflow
/// metadata element, with or without a namespace prefix.
pub fn labels_from_metadata(meterflow: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = meterflow;
    while let Some(i) = rest.find('<') {
        let t = &rest[i..];
        let name_end = t[1..]
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .map_or(t.len(), |j| j + 1);
        let local = t[1..name_end].rsplit(':').next().unwrap_or_default();
        let Some(tag_end) = t.find('>') else { break };
        if local == "label" {
            if let Some(name) = attr(t, "name") {
                let value = match attr(t, "value") {
                    Some(v) => v,
                    None if t[..tag_end].ends_with('/') => String::new(),
                    None => {
                        let body = &t[tag_end + 1..];
                        body[..body.find('<').unwrap_or(body.len())]
                            .trim()
                            .to_string()
                    }
                };
                out.insert(unescape(&name), unescape(&value));
            }
        }
        rest = &t[tag_end + 1..];
    }
    out
}

/// The five predefined XML entities (libvirt escapes metadata text with them).
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
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

    fn test_node() -> String {
        format!(
            "test://{}/../../tests/fixtures/libvirt-node.xml",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_domain_costs_only_itself_and_never_piles_up_threads() {
        let timeout = Duration::from_millis(300);
        let src = LibvirtSource::open(&test_node(), timeout, Duration::from_secs(5))
            .expect("test driver opens");
        let (all, errors) = src.poll().await.expect("poll");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(all.len(), 4, "three running domains and one shut off");
        // db-1's calls now hang for far longer than the deadline
        src.inject_hang("db-1", Duration::from_secs(3));
        let t = Instant::now();
        let (r, e) = src.poll().await.expect("poll");
        let took = t.elapsed();
        assert_eq!(r.len(), 3, "every other domain is read: {r:?}");
        assert!(r.iter().all(|x| x.name != "db-1"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].instance, "22222222-2222-4222-8222-222222222222");
        assert!(e[0].reason.contains("deadline"), "{}", e[0].reason);
        assert!(
            took < Duration::from_secs(3),
            "the poll waited for the hung call: {took:?}"
        );
        // while the call is stuck the domain is skipped at once; nothing else suffers
        for _ in 0..5 {
            let (r, e) = src.poll().await.expect("poll");
            assert_eq!((r.len(), e.len()), (3, 1));
            assert!(e[0].reason.contains("has not returned"), "{}", e[0].reason);
        }
        assert!(
            src.threads() <= WORKERS + 1,
            "one written-off worker at most: {}",
            src.threads()
        );
        // once the stuck call returns, the domain is read again
        src.inject_hang("db-1", Duration::ZERO);
        std::thread::sleep(Duration::from_secs(3));
        let (r, e) = src.poll().await.expect("poll");
        assert_eq!((r.len(), e.len()), (4, 0), "{e:?}");
        assert!(src.threads() <= WORKERS + 1);
    }

    #[test]
    fn labels_from_meterflow_metadata() {
        let mf = r#"<instance xmlns="https://meterflow.dev/xmlns/instance/1" user="a" entity="b">
            <label name="team">web &amp; api</label>
            <mf:label name="tier" value="gold"/>
            <labelled name="x">no</labelled>
          </instance>"#;
        let l = labels_from_metadata(mf);
        assert_eq!(l.get("team").map(String::as_str), Some("web & api"));
        assert_eq!(l.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(l.len(), 2);
    }
}
