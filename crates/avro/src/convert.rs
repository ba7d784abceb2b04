//! Record ⇄ Avro `Value`, one impl per wire type. Field order follows the `.avsc`.

use crate::fast::{Reader, Writer};
use crate::{Compiled, DecodeError};
use apache_avro::types::Value;
use meterflow_types::*;

pub trait Record: Sized {
    const NAME: &'static str;
    #[doc(hidden)]
    fn compiled() -> &'static Compiled;
    fn to_value(&self) -> Value;
    fn from_value(v: Value) -> Result<Self, DecodeError>;
    /// The direct codec (`fast`), for the hot record types: writes the datum and says
    /// true; the others say false and go through `to_value`.
    #[doc(hidden)]
    fn write_datum(&self, _w: &mut Writer<'_>) -> bool {
        false
    }
    /// The direct codec's decoder: `None` for the types without one. It reads the datum
    /// structurally; `Reader::finish` then judges trailing bytes and values that do not fit.
    #[doc(hidden)]
    fn read_datum(_r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        None
    }
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}
fn ts(v: Millis) -> Value {
    Value::TimestampMillis(v)
}
fn dec(d: Dec) -> Value {
    Value::Decimal(apache_avro::Decimal::from(d.raw().to_be_bytes()))
}
fn opt(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}
fn labels(l: &Labels) -> Value {
    Value::Map(l.iter().map(|(k, v)| (k.clone(), s(v))).collect())
}
fn rec(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Named access to a decoded record's fields.
struct Fields {
    schema: &'static str,
    fields: Vec<(String, Value)>,
}

impl Fields {
    fn new(schema: &'static str, v: Value) -> Result<Fields, DecodeError> {
        match v {
            Value::Record(fields) => Ok(Fields { schema, fields }),
            other => Err(DecodeError::InvalidValue {
                schema,
                detail: format!("expected a record, got {other:?}"),
            }),
        }
    }
    fn bad(&self, name: &str, what: &str) -> DecodeError {
        DecodeError::InvalidValue {
            schema: self.schema,
            detail: format!("field {name}: {what}"),
        }
    }
    fn take(&mut self, name: &str) -> Result<Value, DecodeError> {
        let i = self
            .fields
            .iter()
            .position(|(k, _)| k == name)
            .ok_or_else(|| self.bad(name, "missing"))?;
        Ok(std::mem::replace(&mut self.fields[i].1, Value::Null))
    }
    fn string(&mut self, name: &str) -> Result<String, DecodeError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            _ => Err(self.bad(name, "not a string")),
        }
    }
    fn long(&mut self, name: &str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::Long(v) | Value::TimestampMillis(v) => Ok(v),
            Value::Int(v) => Ok(v as i64),
            _ => Err(self.bad(name, "not a long")),
        }
    }
    fn int(&mut self, name: &str) -> Result<i32, DecodeError> {
        match self.take(name)? {
            Value::Int(v) => Ok(v),
            _ => Err(self.bad(name, "not an int")),
        }
    }
    fn boolean(&mut self, name: &str) -> Result<bool, DecodeError> {
        match self.take(name)? {
            Value::Boolean(v) => Ok(v),
            _ => Err(self.bad(name, "not a boolean")),
        }
    }
    fn bytes(&mut self, name: &str) -> Result<Vec<u8>, DecodeError> {
        match self.take(name)? {
            Value::Bytes(v) => Ok(v),
            _ => Err(self.bad(name, "not bytes")),
        }
    }
    fn dec_value(&self, name: &str, v: Value) -> Result<Dec, DecodeError> {
        let Value::Decimal(d) = v else {
            return Err(self.bad(name, "not a decimal"));
        };
        let b: Vec<u8> = Vec::try_from(&d).map_err(|e| self.bad(name, &e.to_string()))?;
        if b.is_empty() || b.len() > 16 {
            return Err(self.bad(name, "decimal does not fit 128 bits"));
        }
        let fill = if b[0] & 0x80 != 0 { 0xFF } else { 0 };
        let mut buf = [fill; 16];
        buf[16 - b.len()..].copy_from_slice(&b);
        let raw = i128::from_be_bytes(buf);
        let d = Dec::from_raw(raw);
        Dec::ZERO
            .checked_add(d)
            .map_err(|e| self.bad(name, &e.to_string()))
    }
    fn dec(&mut self, name: &str) -> Result<Dec, DecodeError> {
        let v = self.take(name)?;
        self.dec_value(name, v)
    }
    fn union(&mut self, name: &str) -> Result<Option<Value>, DecodeError> {
        match self.take(name)? {
            Value::Union(_, b) => match *b {
                Value::Null => Ok(None),
                v => Ok(Some(v)),
            },
            Value::Null => Ok(None),
            _ => Err(self.bad(name, "not a union")),
        }
    }
    fn opt_string(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        match self.union(name)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(name, "not a string")),
        }
    }
    fn opt_long(&mut self, name: &str) -> Result<Option<i64>, DecodeError> {
        match self.union(name)? {
            None => Ok(None),
            Some(Value::Long(v) | Value::TimestampMillis(v)) => Ok(Some(v)),
            Some(_) => Err(self.bad(name, "not a long")),
        }
    }
    fn opt_dec(&mut self, name: &str) -> Result<Option<Dec>, DecodeError> {
        match self.union(name)? {
            None => Ok(None),
            Some(v) => self.dec_value(name, v).map(Some),
        }
    }
    fn opt_bytes(&mut self, name: &str) -> Result<Option<Vec<u8>>, DecodeError> {
        match self.union(name)? {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b)),
            Some(_) => Err(self.bad(name, "not bytes")),
        }
    }
    fn labels(&mut self, name: &str) -> Result<Labels, DecodeError> {
        match self.take(name)? {
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(v) => Ok((k, v)),
                    _ => Err(self.bad(name, "a label value is not a string")),
                })
                .collect(),
            _ => Err(self.bad(name, "not a map")),
        }
    }
    fn record(&mut self, name: &str) -> Result<Fields, DecodeError> {
        let v = self.take(name)?;
        Fields::new(self.schema, v)
    }
}

fn counters_value(c: &Counters) -> Value {
    rec(c
        .fields()
        .iter()
        .map(|(k, v)| (*k, Value::Long(*v)))
        .collect())
}
fn counters_from(mut f: Fields) -> Result<Counters, DecodeError> {
    Ok(Counters {
        cpu_time_ns: f.long("cpu_time_ns")?,
        net_rx_bytes: f.long("net_rx_bytes")?,
        net_tx_bytes: f.long("net_tx_bytes")?,
        disk_read_bytes: f.long("disk_read_bytes")?,
        disk_write_bytes: f.long("disk_write_bytes")?,
    })
}

/// A sample as a view of the bytes it is read from (`decode_samples_view`); the owned
/// decoder reads it the same way and copies it.
pub(crate) fn read_sample<'a>(r: &mut Reader<'a>) -> Result<SampleView<'a>, DecodeError> {
    let counters = |r: &mut Reader<'a>| -> Result<Counters, DecodeError> {
        Ok(Counters {
            cpu_time_ns: r.long()?,
            net_rx_bytes: r.long()?,
            net_tx_bytes: r.long()?,
            disk_read_bytes: r.long()?,
            disk_write_bytes: r.long()?,
        })
    };
    Ok(SampleView {
        id: r.str()?,
        instance_id: r.str()?,
        node_id: r.str()?,
        site: r.str()?,
        kind: r.str()?,
        incarnation: r.str()?,
        seq: r.long()?,
        interval_start: r.long()?,
        interval_end: r.long()?,
        counters: counters(r)?,
        deltas: counters(r)?,
        vcpu_millis: r.long()?,
        memory_alloc_bytes: r.long()?,
        memory_used_bytes: r.opt_long()?,
        owner_hint: r.opt_str()?,
        ended: r.boolean()?,
    })
}

impl Record for Sample {
    const NAME: &'static str = "Sample";
    fn compiled() -> &'static Compiled {
        crate::sample_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        for v in [
            &self.id,
            &self.instance_id,
            &self.node_id,
            &self.site,
            &self.kind,
            &self.incarnation,
        ] {
            w.str(v);
        }
        for v in [self.seq, self.interval_start, self.interval_end] {
            w.long(v);
        }
        for v in self
            .counters
            .fields()
            .iter()
            .chain(self.deltas.fields().iter())
        {
            w.long(v.1);
        }
        w.long(self.vcpu_millis);
        w.long(self.memory_alloc_bytes);
        w.opt_long(self.memory_used_bytes);
        w.opt_str(self.owner_hint.as_deref());
        w.boolean(self.ended);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some(read_sample(r).map(|v| v.to_sample()))
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("id", s(&self.id)),
            ("instance_id", s(&self.instance_id)),
            ("node_id", s(&self.node_id)),
            ("site", s(&self.site)),
            ("kind", s(&self.kind)),
            ("incarnation", s(&self.incarnation)),
            ("seq", Value::Long(self.seq)),
            ("interval_start", ts(self.interval_start)),
            ("interval_end", ts(self.interval_end)),
            ("counters", counters_value(&self.counters)),
            ("deltas", counters_value(&self.deltas)),
            ("vcpu_millis", Value::Long(self.vcpu_millis)),
            ("memory_alloc_bytes", Value::Long(self.memory_alloc_bytes)),
            (
                "memory_used_bytes",
                opt(self.memory_used_bytes.map(Value::Long)),
            ),
            ("owner_hint", opt(self.owner_hint.as_deref().map(s))),
            ("ended", Value::Boolean(self.ended)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(Sample {
            id: f.string("id")?,
            instance_id: f.string("instance_id")?,
            node_id: f.string("node_id")?,
            site: f.string("site")?,
            kind: f.string("kind")?,
            incarnation: f.string("incarnation")?,
            seq: f.long("seq")?,
            interval_start: f.long("interval_start")?,
            interval_end: f.long("interval_end")?,
            counters: counters_from(f.record("counters")?)?,
            deltas: counters_from(f.record("deltas")?)?,
            vcpu_millis: f.long("vcpu_millis")?,
            memory_alloc_bytes: f.long("memory_alloc_bytes")?,
            memory_used_bytes: f.opt_long("memory_used_bytes")?,
            owner_hint: f.opt_string("owner_hint")?,
            ended: f.boolean("ended")?,
        })
    }
}

impl Record for NodeHeartbeat {
    const NAME: &'static str = "NodeHeartbeat";
    fn compiled() -> &'static Compiled {
        crate::node_heartbeat_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        w.str(&self.node_id);
        w.str(&self.site);
        w.str(&self.version);
        w.long(self.time);
        w.int(self.instances);
        w.boolean(self.retired);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some((|| {
            Ok(NodeHeartbeat {
                node_id: r.string()?,
                site: r.string()?,
                version: r.string()?,
                time: r.long()?,
                instances: r.int()?,
                retired: r.boolean()?,
            })
        })())
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("node_id", s(&self.node_id)),
            ("site", s(&self.site)),
            ("version", s(&self.version)),
            ("time", ts(self.time)),
            ("instances", Value::Int(self.instances)),
            ("retired", Value::Boolean(self.retired)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(NodeHeartbeat {
            node_id: f.string("node_id")?,
            site: f.string("site")?,
            version: f.string("version")?,
            time: f.long("time")?,
            instances: f.int("instances")?,
            retired: f.boolean("retired")?,
        })
    }
}

impl Record for InstanceState {
    const NAME: &'static str = "InstanceState";
    fn compiled() -> &'static Compiled {
        crate::instance_c()
    }
    // direct: the enricher reads every registration on the instances topic at each
    // start (one per instance per interval until compaction), where apache-avro's
    // `Value` tree was most of its start-up time
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        w.str(&self.instance_id);
        w.str(&self.node_id);
        w.str(&self.site);
        w.str(&self.kind);
        w.str(&self.name);
        w.str(&self.state);
        w.str(&self.hypervisor);
        w.opt_str(self.flavor.as_deref());
        w.long(self.vcpu_millis);
        w.long(self.memory_alloc_bytes);
        w.long(self.first_seen);
        w.long(self.last_seen);
        w.labels(&self.labels);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some((|| {
            Ok(InstanceState {
                instance_id: r.string()?,
                node_id: r.string()?,
                site: r.string()?,
                kind: r.string()?,
                name: r.string()?,
                state: r.string()?,
                hypervisor: r.string()?,
                flavor: r.opt_string()?,
                vcpu_millis: r.long()?,
                memory_alloc_bytes: r.long()?,
                first_seen: r.long()?,
                last_seen: r.long()?,
                labels: r.labels()?,
            })
        })())
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("instance_id", s(&self.instance_id)),
            ("node_id", s(&self.node_id)),
            ("site", s(&self.site)),
            ("kind", s(&self.kind)),
            ("name", s(&self.name)),
            ("state", s(&self.state)),
            ("hypervisor", s(&self.hypervisor)),
            ("flavor", opt(self.flavor.as_deref().map(s))),
            ("vcpu_millis", Value::Long(self.vcpu_millis)),
            ("memory_alloc_bytes", Value::Long(self.memory_alloc_bytes)),
            ("first_seen", ts(self.first_seen)),
            ("last_seen", ts(self.last_seen)),
            ("labels", labels(&self.labels)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(InstanceState {
            instance_id: f.string("instance_id")?,
            node_id: f.string("node_id")?,
            site: f.string("site")?,
            kind: f.string("kind")?,
            name: f.string("name")?,
            state: f.string("state")?,
            hypervisor: f.string("hypervisor")?,
            flavor: f.opt_string("flavor")?,
            vcpu_millis: f.long("vcpu_millis")?,
            memory_alloc_bytes: f.long("memory_alloc_bytes")?,
            first_seen: f.long("first_seen")?,
            last_seen: f.long("last_seen")?,
            labels: f.labels("labels")?,
        })
    }
}

impl Record for Ownership {
    const NAME: &'static str = "Ownership";
    fn compiled() -> &'static Compiled {
        crate::ownership_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("instance_id", s(&self.instance_id)),
            ("user_id", s(&self.user_id)),
            ("entity_id", s(&self.entity_id)),
            ("project", opt(self.project.as_deref().map(s))),
            ("valid_from", ts(self.valid_from)),
            ("source", s(&self.source)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(Ownership {
            instance_id: f.string("instance_id")?,
            user_id: f.string("user_id")?,
            entity_id: f.string("entity_id")?,
            project: f.opt_string("project")?,
            valid_from: f.long("valid_from")?,
            source: f.string("source")?,
        })
    }
}

/// A usage record's datum, from its view: the one writer of `Usage` bytes, whether the
/// record is owned (`Usage::write_datum`) or borrowed (`crate::encode_usage_into`).
pub(crate) fn write_usage(u: &meterflow_types::UsageView<'_>, w: &mut Writer<'_>) {
    w.str(&u.id);
    w.str(u.sample_id);
    w.str(u.instance_id);
    w.str(u.entity_id);
    w.str(u.user_id);
    w.opt_str(u.project);
    w.str(u.node_id);
    w.str(u.site);
    w.str(u.kind);
    w.opt_str(u.flavor);
    w.long(u.interval_start);
    w.long(u.interval_end);
    w.dec(u.vcpu_seconds);
    w.dec(u.cpu_seconds);
    w.dec(u.memory_byte_seconds);
    w.opt_dec(u.memory_used_byte_seconds);
    w.dec(u.net_rx_bytes);
    w.dec(u.net_tx_bytes);
    w.dec(u.disk_read_bytes);
    w.dec(u.disk_write_bytes);
    w.labels(&u.labels);
}

/// A usage record's datum as a view of the bytes it is read from; its labels read and
/// checked, and kept only if `keep_labels` (else none).
pub(crate) fn read_usage<'a>(
    r: &mut Reader<'a>,
    keep_labels: bool,
) -> Result<UsageView<'a>, DecodeError> {
    Ok(UsageView {
        id: std::borrow::Cow::Borrowed(r.str()?),
        sample_id: r.str()?,
        instance_id: r.str()?,
        entity_id: r.str()?,
        user_id: r.str()?,
        project: r.opt_str()?,
        node_id: r.str()?,
        site: r.str()?,
        kind: r.str()?,
        flavor: r.opt_str()?,
        interval_start: r.long()?,
        interval_end: r.long()?,
        vcpu_seconds: r.dec("vcpu_seconds")?,
        cpu_seconds: r.dec("cpu_seconds")?,
        memory_byte_seconds: r.dec("memory_byte_seconds")?,
        memory_used_byte_seconds: r.opt_dec("memory_used_byte_seconds")?,
        net_rx_bytes: r.dec("net_rx_bytes")?,
        net_tx_bytes: r.dec("net_tx_bytes")?,
        disk_read_bytes: r.dec("disk_read_bytes")?,
        disk_write_bytes: r.dec("disk_write_bytes")?,
        labels: if keep_labels {
            std::borrow::Cow::Owned(r.labels()?)
        } else {
            r.skip_labels()?;
            std::borrow::Cow::Borrowed(&meterflow_types::NO_LABELS)
        },
    })
}

impl Record for Usage {
    const NAME: &'static str = "Usage";
    fn compiled() -> &'static Compiled {
        crate::usage_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        write_usage(&self.view(), w);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some(read_usage(r, true).map(UsageView::into_usage))
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("id", s(&self.id)),
            ("sample_id", s(&self.sample_id)),
            ("instance_id", s(&self.instance_id)),
            ("entity_id", s(&self.entity_id)),
            ("user_id", s(&self.user_id)),
            ("project", opt(self.project.as_deref().map(s))),
            ("node_id", s(&self.node_id)),
            ("site", s(&self.site)),
            ("kind", s(&self.kind)),
            ("flavor", opt(self.flavor.as_deref().map(s))),
            ("interval_start", ts(self.interval_start)),
            ("interval_end", ts(self.interval_end)),
            ("vcpu_seconds", dec(self.vcpu_seconds)),
            ("cpu_seconds", dec(self.cpu_seconds)),
            ("memory_byte_seconds", dec(self.memory_byte_seconds)),
            (
                "memory_used_byte_seconds",
                opt(self.memory_used_byte_seconds.map(dec)),
            ),
            ("net_rx_bytes", dec(self.net_rx_bytes)),
            ("net_tx_bytes", dec(self.net_tx_bytes)),
            ("disk_read_bytes", dec(self.disk_read_bytes)),
            ("disk_write_bytes", dec(self.disk_write_bytes)),
            ("labels", labels(&self.labels)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(Usage {
            id: f.string("id")?,
            sample_id: f.string("sample_id")?,
            instance_id: f.string("instance_id")?,
            entity_id: f.string("entity_id")?,
            user_id: f.string("user_id")?,
            project: f.opt_string("project")?,
            node_id: f.string("node_id")?,
            site: f.string("site")?,
            kind: f.string("kind")?,
            flavor: f.opt_string("flavor")?,
            interval_start: f.long("interval_start")?,
            interval_end: f.long("interval_end")?,
            vcpu_seconds: f.dec("vcpu_seconds")?,
            cpu_seconds: f.dec("cpu_seconds")?,
            memory_byte_seconds: f.dec("memory_byte_seconds")?,
            memory_used_byte_seconds: f.opt_dec("memory_used_byte_seconds")?,
            net_rx_bytes: f.dec("net_rx_bytes")?,
            net_tx_bytes: f.dec("net_tx_bytes")?,
            disk_read_bytes: f.dec("disk_read_bytes")?,
            disk_write_bytes: f.dec("disk_write_bytes")?,
            labels: f.labels("labels")?,
        })
    }
}

impl Record for RatedEvent {
    const NAME: &'static str = "RatedEvent";
    fn compiled() -> &'static Compiled {
        crate::rated_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        w.str(&self.id);
        w.str(&self.rule_id);
        w.int(self.rule_version);
        w.str(&self.entity_id);
        w.str(&self.resource_id);
        w.long(self.window_start);
        w.long(self.window_end);
        w.str(&self.unit);
        w.dec(self.quantity);
        w.dec(self.unit_price);
        w.dec(self.amount);
        w.str(&self.currency);
        w.boolean(self.adjustment);
        w.long(self.usage_records);
        w.int(self.source_partition);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some((|| {
            Ok(RatedEvent {
                id: r.string()?,
                rule_id: r.string()?,
                rule_version: r.int()?,
                entity_id: r.string()?,
                resource_id: r.string()?,
                window_start: r.long()?,
                window_end: r.long()?,
                unit: r.string()?,
                quantity: r.dec("quantity")?,
                unit_price: r.dec("unit_price")?,
                amount: r.dec("amount")?,
                currency: r.string()?,
                adjustment: r.boolean()?,
                usage_records: r.long()?,
                source_partition: r.int()?,
            })
        })())
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("id", s(&self.id)),
            ("rule_id", s(&self.rule_id)),
            ("rule_version", Value::Int(self.rule_version)),
            ("entity_id", s(&self.entity_id)),
            ("resource_id", s(&self.resource_id)),
            ("window_start", ts(self.window_start)),
            ("window_end", ts(self.window_end)),
            ("unit", s(&self.unit)),
            ("quantity", dec(self.quantity)),
            ("unit_price", dec(self.unit_price)),
            ("amount", dec(self.amount)),
            ("currency", s(&self.currency)),
            ("adjustment", Value::Boolean(self.adjustment)),
            ("usage_records", Value::Long(self.usage_records)),
            ("source_partition", Value::Int(self.source_partition)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(RatedEvent {
            id: f.string("id")?,
            rule_id: f.string("rule_id")?,
            rule_version: f.int("rule_version")?,
            entity_id: f.string("entity_id")?,
            resource_id: f.string("resource_id")?,
            window_start: f.long("window_start")?,
            window_end: f.long("window_end")?,
            unit: f.string("unit")?,
            quantity: f.dec("quantity")?,
            unit_price: f.dec("unit_price")?,
            amount: f.dec("amount")?,
            currency: f.string("currency")?,
            adjustment: f.boolean("adjustment")?,
            usage_records: f.long("usage_records")?,
            source_partition: f.int("source_partition")?,
        })
    }
}

impl Record for Watermark {
    const NAME: &'static str = "Watermark";
    fn compiled() -> &'static Compiled {
        crate::watermark_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        w.str(&self.stage);
        w.int(self.source_partition);
        w.int(self.source_partitions);
        w.long(self.time);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some((|| {
            let w = Watermark {
                stage: r.string()?,
                source_partition: r.int()?,
                source_partitions: r.int()?,
                time: r.long()?,
            };
            if w.source_partitions <= 0
                || w.source_partition < 0
                || w.source_partition >= w.source_partitions
            {
                r.invalid("source_partition", "outside 0..source_partitions");
            }
            Ok(w)
        })())
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("stage", s(&self.stage)),
            ("source_partition", Value::Int(self.source_partition)),
            ("source_partitions", Value::Int(self.source_partitions)),
            ("time", ts(self.time)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let w = Watermark {
            stage: f.string("stage")?,
            source_partition: f.int("source_partition")?,
            source_partitions: f.int("source_partitions")?,
            time: f.long("time")?,
        };
        if w.source_partitions <= 0
            || w.source_partition < 0
            || w.source_partition >= w.source_partitions
        {
            return Err(f.bad("source_partition", "outside 0..source_partitions"));
        }
        Ok(w)
    }
}

impl Record for DlqRecord {
    const NAME: &'static str = "DlqRecord";
    fn compiled() -> &'static Compiled {
        crate::dlq_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("id", s(&self.id)),
            ("stage", s(&self.stage)),
            ("topic", s(&self.topic)),
            ("partition", Value::Int(self.partition)),
            ("offset", Value::Long(self.offset)),
            ("reason_code", s(&self.reason_code)),
            ("reason", s(&self.reason)),
            ("key", opt(self.key.clone().map(Value::Bytes))),
            ("payload", Value::Bytes(self.payload.clone())),
            ("time", ts(self.time)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(DlqRecord {
            id: f.string("id")?,
            stage: f.string("stage")?,
            topic: f.string("topic")?,
            partition: f.int("partition")?,
            offset: f.long("offset")?,
            reason_code: f.string("reason_code")?,
            reason: f.string("reason")?,
            key: f.opt_bytes("key")?,
            payload: f.bytes("payload")?,
            time: f.long("time")?,
        })
    }
}

impl Record for RaterCheckpoint {
    const NAME: &'static str = "RaterCheckpoint";
    fn compiled() -> &'static Compiled {
        crate::rater_checkpoint_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("ruleset", s(&self.ruleset)),
            ("partition", Value::Int(self.partition)),
            ("resume_offset", Value::Long(self.resume_offset)),
            ("position", Value::Long(self.position)),
            (
                "source_times",
                Value::Array(self.source_times.iter().map(|t| Value::Long(*t)).collect()),
            ),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let ruleset = f.string("ruleset")?;
        let partition = f.int("partition")?;
        let resume_offset = f.long("resume_offset")?;
        let position = f.long("position")?;
        let Value::Array(items) = f.take("source_times")? else {
            return Err(f.bad("source_times", "not an array"));
        };
        let mut source_times = Vec::with_capacity(items.len());
        for it in items {
            match it {
                Value::Long(t) => source_times.push(t),
                _ => return Err(f.bad("source_times", "item not a long")),
            }
        }
        Ok(RaterCheckpoint {
            ruleset,
            partition,
            resume_offset,
            position,
            source_times,
        })
    }
}

impl Record for Settlement {
    const NAME: &'static str = "Settlement";
    fn compiled() -> &'static Compiled {
        crate::settlement_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("entity_id", s(&self.entity_id)),
            ("period", s(&self.period)),
            ("period_start", ts(self.period_start)),
            ("period_end", ts(self.period_end)),
            ("version", Value::Int(self.version)),
            ("directory", s(&self.directory)),
            ("manifest", s(&self.manifest)),
            ("line_count", Value::Long(self.line_count)),
            ("totals", labels(&self.totals)),
            ("files", labels(&self.files)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        Ok(Settlement {
            entity_id: f.string("entity_id")?,
            period: f.string("period")?,
            period_start: f.long("period_start")?,
            period_end: f.long("period_end")?,
            version: f.int("version")?,
            directory: f.string("directory")?,
            manifest: f.string("manifest")?,
            line_count: f.long("line_count")?,
            totals: f.labels("totals")?,
            files: f.labels("files")?,
        })
    }
}

impl Record for RaterToDate {
    const NAME: &'static str = "RaterToDate";
    fn compiled() -> &'static Compiled {
        crate::rater_to_date_c()
    }
    fn to_value(&self) -> Value {
        let arr = |v: &[Dec]| Value::Array(v.iter().map(|d| dec(*d)).collect());
        rec(vec![
            ("partition", Value::Int(self.partition)),
            ("rule", s(&self.rule)),
            ("period_start", ts(self.period_start)),
            ("entity_id", s(&self.entity_id)),
            ("last_window", ts(self.last_window)),
            ("before", arr(&self.before)),
            ("after", arr(&self.after)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let partition = f.int("partition")?;
        let rule = f.string("rule")?;
        let period_start = f.long("period_start")?;
        let entity_id = f.string("entity_id")?;
        let last_window = f.long("last_window")?;
        let mut decs = |name: &str| -> Result<Vec<Dec>, DecodeError> {
            let Value::Array(items) = f.take(name)? else {
                return Err(f.bad(name, "not an array"));
            };
            items.into_iter().map(|i| f.dec_value(name, i)).collect()
        };
        let before = decs("before")?;
        let after = decs("after")?;
        Ok(RaterToDate {
            partition,
            rule,
            period_start,
            entity_id,
            last_window,
            before,
            after,
        })
    }
}

impl Record for RaterClosedWindow {
    const NAME: &'static str = "RaterClosedWindow";
    fn compiled() -> &'static Compiled {
        crate::rater_closed_window_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("partition", Value::Int(self.partition)),
            ("rule", s(&self.rule)),
            ("window_start", ts(self.window_start)),
            ("ids", Value::Bytes(self.ids.clone())),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let partition = f.int("partition")?;
        let rule = f.string("rule")?;
        let window_start = f.long("window_start")?;
        let ids = f.bytes("ids")?;
        if ids.len() % 16 != 0 {
            return Err(f.bad("ids", "not a whole number of 16-byte keys"));
        }
        Ok(RaterClosedWindow {
            partition,
            rule,
            window_start,
            ids,
        })
    }
}

impl Record for RuleSet {
    const NAME: &'static str = "RuleSet";
    fn compiled() -> &'static Compiled {
        crate::rule_set_c()
    }
    fn to_value(&self) -> Value {
        let files = self
            .files
            .iter()
            .map(|(n, c)| rec(vec![("name", s(n)), ("content", Value::Bytes(c.clone()))]))
            .collect();
        rec(vec![
            ("id", s(&self.id)),
            ("previous", opt(self.previous.as_deref().map(s))),
            ("switch_at", opt(self.switch_at.map(ts))),
            ("applied_at", ts(self.applied_at)),
            ("applied_by", s(&self.applied_by)),
            ("files", Value::Array(files)),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let id = f.string("id")?;
        let previous = f.opt_string("previous")?;
        let switch_at = f.opt_long("switch_at")?;
        let applied_at = f.long("applied_at")?;
        let applied_by = f.string("applied_by")?;
        let Value::Array(items) = f.take("files")? else {
            return Err(f.bad("files", "not an array"));
        };
        let files = items
            .into_iter()
            .map(|i| {
                let mut r = Fields::new(Self::NAME, i)?;
                Ok((r.string("name")?, r.bytes("content")?))
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(RuleSet {
            id,
            previous,
            switch_at,
            applied_at,
            applied_by,
            files,
        })
    }
}

impl Record for SettlerProgress {
    const NAME: &'static str = "SettlerProgress";
    fn compiled() -> &'static Compiled {
        crate::settler_progress_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("partition", Value::Int(self.partition)),
            ("partitions", Value::Int(self.partitions)),
            ("member", s(&self.member)),
            ("closed_through", ts(self.closed_through)),
            (
                "corrected",
                Value::Array(self.corrected.iter().map(|c| s(c)).collect()),
            ),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let partition = f.int("partition")?;
        let partitions = f.int("partitions")?;
        let member = f.string("member")?;
        let closed_through = f.long("closed_through")?;
        let Value::Array(items) = f.take("corrected")? else {
            return Err(f.bad("corrected", "not an array"));
        };
        let corrected = items
            .into_iter()
            .map(|i| match i {
                Value::String(x) => Ok(x),
                _ => Err(f.bad("corrected", "not a string")),
            })
            .collect::<Result<_, _>>()?;
        if partition < 0 || partition >= partitions {
            return Err(f.bad("partition", "outside 0..partitions"));
        }
        Ok(SettlerProgress {
            partition,
            partitions,
            member,
            closed_through,
            corrected,
        })
    }
}

impl Record for EnricherCheckpoint {
    const NAME: &'static str = "EnricherCheckpoint";
    fn compiled() -> &'static Compiled {
        crate::enricher_checkpoint_c()
    }
    fn to_value(&self) -> Value {
        rec(vec![
            ("partition", Value::Int(self.partition)),
            (
                "seen",
                Value::Array(
                    self.seen
                        .iter()
                        .map(|e| {
                            rec(vec![
                                ("instance_id", s(&e.instance_id)),
                                ("incarnation", s(&e.incarnation)),
                                ("seq", Value::Long(e.seq)),
                                ("interval_end", ts(e.interval_end)),
                            ])
                        })
                        .collect(),
                ),
            ),
        ])
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(Self::NAME, v)?;
        let partition = f.int("partition")?;
        let Value::Array(items) = f.take("seen")? else {
            return Err(f.bad("seen", "not an array"));
        };
        let mut seen = Vec::with_capacity(items.len());
        for it in items {
            let mut e = Fields::new(Self::NAME, it)?;
            seen.push(SeenSample {
                instance_id: e.string("instance_id")?,
                incarnation: e.string("incarnation")?,
                seq: e.long("seq")?,
                interval_end: e.long("interval_end")?,
            });
        }
        Ok(EnricherCheckpoint { partition, seen })
    }
}

/// Low-volume records (queries and their replies) convert through serde: the value is
/// resolved against the schema (unions, nested records), and decoding reports any
/// mismatch as an invalid value.
fn serde_to<T: serde::Serialize>(r: &T, c: &Compiled) -> Value {
    // A record's serde form matches its schema (round-trip tested below).
    #[allow(clippy::expect_used)]
    apache_avro::to_value(r)
        .and_then(|v| v.resolve(&c.schema))
        .expect("record matches its schema")
}

fn serde_from<T: serde::de::DeserializeOwned>(
    schema: &'static str,
    v: Value,
) -> Result<T, DecodeError> {
    apache_avro::from_value(&v).map_err(|e| DecodeError::InvalidValue {
        schema,
        detail: e.to_string(),
    })
}

impl Record for MeteringRequest {
    const NAME: &'static str = "MeteringRequest";
    fn compiled() -> &'static Compiled {
        crate::metering_request_c()
    }
    fn to_value(&self) -> Value {
        serde_to(self, Self::compiled())
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        serde_from(Self::NAME, v)
    }
}

impl Record for MeteringReply {
    const NAME: &'static str = "MeteringReply";
    fn compiled() -> &'static Compiled {
        crate::metering_reply_c()
    }
    fn to_value(&self) -> Value {
        serde_to(self, Self::compiled())
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        serde_from(Self::NAME, v)
    }
}

// direct: every stage sends its audit counts (one per topic, direction and event-time
// bucket touched) with each commit; through apache-avro's `Value` they were ~2.6 % of the
// monthly settler's CPU at ten times the days (BENCHMARKS.md, session 34)
impl Record for AuditCount {
    const NAME: &'static str = "AuditCount";
    fn compiled() -> &'static Compiled {
        crate::audit_count_c()
    }
    fn write_datum(&self, w: &mut Writer<'_>) -> bool {
        for v in [&self.stage, &self.member, &self.topic, &self.direction] {
            w.str(v);
        }
        for v in [self.bucket_start, self.bucket_ms, self.count] {
            w.long(v);
        }
        w.str(&self.quantity);
        w.long(self.sent_at);
        true
    }
    fn read_datum(r: &mut Reader<'_>) -> Option<Result<Self, DecodeError>> {
        Some((|| {
            Ok(AuditCount {
                stage: r.string()?,
                member: r.string()?,
                topic: r.string()?,
                direction: r.string()?,
                bucket_start: r.long()?,
                bucket_ms: r.long()?,
                count: r.long()?,
                quantity: r.string()?,
                sent_at: r.long()?,
            })
        })())
    }
    fn to_value(&self) -> Value {
        serde_to(self, Self::compiled())
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        serde_from(Self::NAME, v)
    }
}

impl Record for ProbeSpec {
    const NAME: &'static str = "ProbeSpec";
    fn compiled() -> &'static Compiled {
        crate::probe_spec_c()
    }
    fn to_value(&self) -> Value {
        serde_to(self, Self::compiled())
    }
    fn from_value(v: Value) -> Result<Self, DecodeError> {
        serde_from(Self::NAME, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use apache_avro::Schema;

    fn d(s: &str) -> Dec {
        s.parse().expect("decimal")
    }

    fn sample() -> Sample {
        Sample {
            id: "s1".into(),
            instance_id: "i-1".into(),
            node_id: "n1".into(),
            site: "eu-1".into(),
            kind: "vm".into(),
            incarnation: "7".into(),
            seq: 3,
            interval_start: 1_700_000_000_000,
            interval_end: 1_700_000_010_000,
            counters: Counters {
                cpu_time_ns: 10,
                net_rx_bytes: 1,
                net_tx_bytes: 2,
                disk_read_bytes: 3,
                disk_write_bytes: 4,
            },
            deltas: Counters {
                cpu_time_ns: 5,
                ..Default::default()
            },
            vcpu_millis: 2000,
            memory_alloc_bytes: 1 << 30,
            memory_used_bytes: Some(1 << 29),
            owner_hint: None,
            ended: false,
        }
    }
    fn usage() -> Usage {
        Usage {
            id: "u".into(),
            sample_id: "s".into(),
            instance_id: "i".into(),
            entity_id: "e".into(),
            user_id: "u1".into(),
            project: Some("p".into()),
            node_id: "n".into(),
            site: "x".into(),
            kind: "vm".into(),
            flavor: None,
            interval_start: 0,
            interval_end: 10,
            vcpu_seconds: d("20"),
            cpu_seconds: d("0.000000001"),
            memory_byte_seconds: d("-99999999999999999999999999999.999999999"),
            memory_used_byte_seconds: Some(d("1.5")),
            net_rx_bytes: d("0"),
            net_tx_bytes: d("170141183460469231731.687303715"),
            disk_read_bytes: d("-1"),
            disk_write_bytes: d("256"),
            labels: [("team".to_string(), "web".to_string())].into(),
        }
    }
    fn rated() -> RatedEvent {
        RatedEvent {
            id: "r".into(),
            rule_id: "vcpu".into(),
            rule_version: 1,
            entity_id: "e".into(),
            resource_id: String::new(),
            window_start: 0,
            window_end: 3_600_000,
            unit: "vcpu_hour".into(),
            quantity: d("2"),
            unit_price: d("0.036"),
            amount: d("0.072"),
            currency: "USD".into(),
            adjustment: false,
            usage_records: 360,
            source_partition: 2,
        }
    }

    fn round_trip<R: Record + PartialEq + std::fmt::Debug + Clone>(r: R, json: &str) {
        assert!(
            value_is_valid(&r),
            "{} value does not validate against its schema",
            R::NAME
        );
        let bytes = encode(&r);
        assert_eq!(decode::<R>(&bytes).expect("decodes"), r);
        // the Rust type's fields are exactly the .avsc's fields, in order
        let Value::Record(fields) = r.to_value() else {
            panic!("record")
        };
        let Schema::Record(rs) = Schema::parse_str(json).expect("schema") else {
            panic!("record schema")
        };
        let names: Vec<_> = fields.iter().map(|(k, _)| k.clone()).collect();
        let schema_names: Vec<_> = rs.fields.iter().map(|f| f.name.clone()).collect();
        assert_eq!(names, schema_names, "{} disagrees with its .avsc", R::NAME);
        // No truncation decodes (apache-avro reads a union at the end of the input as
        // null; `decode` catches that) and none panics.
        for cut in 0..bytes.len() {
            assert!(
                decode::<R>(&bytes[..cut]).is_err(),
                "{} cut at byte {cut} of {} decoded",
                R::NAME,
                bytes.len()
            );
        }
        assert!(
            decode::<R>(&bytes[..bytes.len() / 2]).is_err(),
            "{} cut in half decoded",
            R::NAME
        );
    }

    #[test]
    fn every_type_round_trips_and_agrees_with_its_avsc() {
        round_trip(sample(), schemas::SAMPLE);
        let mut s2 = sample();
        s2.memory_used_bytes = None;
        s2.owner_hint = Some("acme".into());
        s2.ended = true;
        round_trip(s2, schemas::SAMPLE);
        round_trip(
            NodeHeartbeat {
                node_id: "n".into(),
                site: "s".into(),
                version: "0.1".into(),
                time: 5,
                instances: 3,
                retired: true,
            },
            schemas::NODE_HEARTBEAT,
        );
        round_trip(
            InstanceState {
                instance_id: "i".into(),
                node_id: "n".into(),
                site: "s".into(),
                kind: "vm".into(),
                name: "web".into(),
                state: "running".into(),
                hypervisor: "test".into(),
                flavor: Some("m1.small".into()),
                vcpu_millis: 1000,
                memory_alloc_bytes: 2,
                first_seen: 3,
                last_seen: 4,
                labels: [
                    ("a".to_string(), "1".to_string()),
                    ("b".to_string(), String::new()),
                ]
                .into(),
            },
            schemas::INSTANCE,
        );
        round_trip(
            Ownership {
                instance_id: "i".into(),
                user_id: "u".into(),
                entity_id: "e".into(),
                project: None,
                valid_from: 9,
                source: "cli".into(),
            },
            schemas::OWNERSHIP,
        );
        round_trip(usage(), schemas::USAGE);
        round_trip(rated(), schemas::RATED);
        round_trip(
            Watermark {
                stage: "enricher".into(),
                source_partition: 1,
                source_partitions: 3,
                time: 77,
            },
            schemas::WATERMARK,
        );
        round_trip(
            DlqRecord {
                id: "x".into(),
                stage: "enricher".into(),
                topic: "t".into(),
                partition: 0,
                offset: 5,
                reason_code: "undecodable".into(),
                reason: "why".into(),
                key: Some(vec![1, 2]),
                payload: vec![0, 255],
                time: 1,
            },
            schemas::DLQ,
        );
        round_trip(
            RaterCheckpoint {
                ruleset: "r".into(),
                partition: 1,
                resume_offset: 5,
                position: 9,
                source_times: vec![i64::MIN, 3],
            },
            schemas::RATER_CHECKPOINT,
        );
        round_trip(
            EnricherCheckpoint {
                partition: 3,
                seen: vec![SeenSample {
                    instance_id: "i".into(),
                    incarnation: "n1:7".into(),
                    seq: 42,
                    interval_end: 9,
                }],
            },
            schemas::ENRICHER_CHECKPOINT,
        );
        round_trip(
            RaterToDate {
                partition: 1,
                rule: "tiers@2".into(),
                period_start: 5,
                entity_id: "acme".into(),
                last_window: 7,
                before: vec![d("1.5"), d("0")],
                after: vec![d("2.5"), d("-3")],
            },
            schemas::RATER_TO_DATE,
        );
        round_trip(
            RaterClosedWindow {
                partition: 2,
                rule: "vcpu_hours@1".into(),
                window_start: 3_600_000,
                ids: (0u8..32).collect(),
            },
            schemas::RATER_CLOSED_WINDOW,
        );
        round_trip(
            Settlement {
                entity_id: "acme".into(),
                period: "2026-03".into(),
                period_start: 1,
                period_end: 2,
                version: 2,
                directory: "period=2026-03/entity=acme".into(),
                manifest: "v2.manifest.json".into(),
                line_count: 7,
                totals: [("USD".to_string(), "12.34".to_string())].into(),
                files: [("v2.lines.csv".to_string(), "ab".to_string())].into(),
            },
            schemas::SETTLEMENT,
        );
        round_trip(
            RuleSet {
                id: "abc".into(),
                previous: Some("xyz".into()),
                switch_at: Some(3_600_000),
                applied_at: 9,
                applied_by: "me@host".into(),
                files: vec![("cpu@2.sql".into(), b"select 1".to_vec())],
            },
            schemas::RULE_SET,
        );
        round_trip(
            RuleSet {
                id: "abc".into(),
                previous: None,
                switch_at: None,
                applied_at: 9,
                applied_by: String::new(),
                files: Vec::new(),
            },
            schemas::RULE_SET,
        );
        round_trip(
            SettlerProgress {
                partition: 1,
                partitions: 4,
                member: "settler-2".into(),
                closed_through: 86_400_000,
                corrected: vec!["2026-03".into()],
            },
            schemas::SETTLER_PROGRESS,
        );
        let request = MeteringRequest {
            id: "q-1".into(),
            reply_topic: "meterflow.replies".into(),
            sent_at: 1,
            deadline: 2,
            instances: vec!["i-1".into()],
            all_instances: false,
            metrics: vec!["cpu".into()],
            from: Some(0),
            to: None,
        };
        round_trip(request.clone(), schemas::METERING_REQUEST);
        round_trip(
            AuditCount {
                stage: "enricher".into(),
                member: "m".into(),
                topic: "meterflow.usage".into(),
                direction: "out".into(),
                bucket_start: 3_600_000,
                bucket_ms: 3_600_000,
                count: 7,
                quantity: "1.5".into(),
                sent_at: 9,
            },
            schemas::AUDIT_COUNT,
        );
        round_trip(
            ProbeSpec {
                point: "enricher.join".into(),
                measures: vec!["hop_latency".into(), "lag".into()],
                sample_rate: "0.25".into(),
                added_at: 5,
                added_by: "ops".into(),
            },
            schemas::PROBE_SPEC,
        );
        round_trip(
            MeteringReply {
                request_id: "q-1".into(),
                node_id: "n".into(),
                site: "s".into(),
                answered_at: 3,
                live_time: 4,
                log_from: None,
                errors: vec!["x".into()],
                instances: vec![InstanceAnswer {
                    instance_id: "i-1".into(),
                    name: "web".into(),
                    kind: "vm".into(),
                    state: "running".into(),
                    owner_hint: Some("alice/acme".into()),
                    live: [("vcpus".to_string(), "2".to_string())].into(),
                    usage: [("cpu_seconds".to_string(), "1.5".to_string())].into(),
                    samples: 3,
                }],
            },
            schemas::METERING_REPLY,
        );
        // a reply is not a request
        assert_eq!(
            decode::<MeteringRequest>(&encode(&MeteringReply {
                request_id: String::new(),
                node_id: String::new(),
                site: String::new(),
                answered_at: 0,
                live_time: 0,
                log_from: Some(1),
                errors: Vec::new(),
                instances: Vec::new(),
            }))
            .map_err(|e| e.reason_code()),
            Err("wrong_schema")
        );
    }

    #[test]
    fn topics_dispatch_on_the_schema_fingerprint() {
        let hb = NodeHeartbeat {
            node_id: "n".into(),
            site: "s".into(),
            version: "v".into(),
            time: 5,
            instances: 0,
            retired: false,
        };
        assert_eq!(
            decode_samples_msg(&encode(&sample())).expect("ok"),
            SamplesMsg::Sample(sample())
        );
        assert_eq!(
            decode_samples_msg(&encode(&hb)).expect("ok"),
            SamplesMsg::Heartbeat(hb)
        );
        assert!(matches!(
            decode_usage_msg(&encode(&usage())),
            Ok(UsageMsg::Usage(_))
        ));
        assert!(matches!(
            decode_rated_msg(&encode(&rated())),
            Ok(RatedMsg::Rated(_))
        ));
    }

    #[test]
    fn bad_bytes_get_reason_codes() {
        assert_eq!(
            decode_samples_msg(b"hello world").map_err(|e| e.reason_code()),
            Err("undecodable")
        );
        assert_eq!(
            decode_samples_msg(&encode(&usage())).map_err(|e| e.reason_code()),
            Err("wrong_schema")
        );
        assert_eq!(
            decode_samples_msg(&vec![0u8; MAX_MESSAGE_BYTES + 1]).map_err(|e| e.reason_code()),
            Err("oversized")
        );
        let mut b = encode(&sample());
        b.push(0);
        assert_eq!(
            decode::<Sample>(&b).map_err(|e| e.reason_code()),
            Err("undecodable")
        );
        // a decimal longer than 128 bits
        let mut v = usage().to_value();
        if let Value::Record(f) = &mut v {
            f[12].1 = Value::Decimal(apache_avro::Decimal::from(vec![1u8; 17]));
        }
        assert_eq!(
            Usage::from_value(v).map_err(|e| e.reason_code()),
            Err("invalid_value")
        );
        // invalid watermark partition
        let w = Watermark {
            stage: "e".into(),
            source_partition: 3,
            source_partitions: 3,
            time: 0,
        };
        assert_eq!(
            decode::<Watermark>(&encode(&w)).map_err(|e| e.reason_code()),
            Err("invalid_value")
        );
    }

    /// xorshift: a fixed stream of pseudo-random numbers, so the test is the same every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// The direct codec agrees with apache-avro on `bytes`: the same record, or the same
    /// reason code.
    fn agree<R: Record + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> bool {
        let (fast, generic) = (decode::<R>(bytes), crate::generic::decode::<R>(bytes));
        match (&fast, &generic) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{} decoded differently", R::NAME),
            (Err(a), Err(b)) => assert_eq!(
                a.reason_code(),
                b.reason_code(),
                "{}: direct {a} / apache-avro {b} on {bytes:02x?}",
                R::NAME
            ),
            _ => panic!(
                "{}: direct {fast:?} / apache-avro {generic:?} on {bytes:02x?}",
                R::NAME
            ),
        }
        fast.is_ok()
    }

    /// Every hot record type: the direct encoder writes apache-avro's bytes, and on
    /// 20,000 mutations of them (bytes changed, inserted, removed, cut; varints and
    /// lengths stretched) both decoders give the same record or the same reason code.
    fn differential<R: Record + PartialEq + std::fmt::Debug>(records: &[R], seed: u64) {
        let mut rng = Rng(seed);
        let (mut ok, mut bad) = (0, 0);
        for r in records {
            let bytes = encode(r);
            assert_eq!(bytes, crate::generic::encode(r), "{} bytes differ", R::NAME);
            assert!(agree::<R>(&bytes));
            for m in mutants(&bytes, &mut rng, 20_000 / records.len()) {
                if agree::<R>(&m) {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
        }
        // both sides of the comparison were exercised
        assert!(
            ok > 100 && bad > 1000,
            "{}: {ok} decoded, {bad} refused",
            R::NAME
        );
    }

    /// `n` mutations of a message (past its header): bytes changed, inserted, removed,
    /// cut; varints and lengths stretched.
    fn mutants(bytes: &[u8], rng: &mut Rng, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut m = bytes.to_vec();
                for _ in 0..1 + rng.below(3) {
                    let at = 10 + rng.below(m.len().saturating_sub(10));
                    match rng.below(7) {
                        0 if at < m.len() => m[at] = rng.next() as u8,
                        1 if at < m.len() => m[at] ^= 1 << rng.below(8),
                        2 => m.insert(at.min(m.len()), rng.next() as u8),
                        3 if at < m.len() => {
                            m.remove(at);
                        }
                        4 => m.truncate(at),
                        5 if at < m.len() => m[at] |= 0x80, // a longer varint
                        6 if at < m.len() => {
                            // a plausible other length or union index
                            m[at] = [0u8, 1, 2, 3, 4, 0x20, 0x21, 0x22, 0x7f][rng.below(9)]
                        }
                        _ => {}
                    }
                }
                m
            })
            .collect()
    }

    #[test]
    fn a_sample_view_reads_what_a_sample_reads() {
        let mut s2 = sample();
        s2.memory_used_bytes = None;
        s2.owner_hint = Some("acme".into());
        let hb = NodeHeartbeat {
            node_id: "n".into(),
            site: "eu-1".into(),
            version: "0.1".into(),
            time: 7,
            instances: 3,
            retired: false,
        };
        let mut rng = Rng(9);
        let (mut ok, mut bad) = (0, 0);
        for bytes in [encode(&sample()), encode(&s2), encode(&hb)] {
            for m in mutants(&bytes, &mut rng, 5_000).into_iter().chain([bytes]) {
                match (
                    crate::decode_samples_msg(&m),
                    crate::decode_samples_view(&m),
                ) {
                    (Ok(crate::SamplesMsg::Sample(a)), Ok(crate::SamplesViewMsg::Sample(v))) => {
                        assert_eq!(v.to_sample(), a);
                        assert_eq!(a.view(), v);
                        ok += 1;
                    }
                    (
                        Ok(crate::SamplesMsg::Heartbeat(a)),
                        Ok(crate::SamplesViewMsg::Heartbeat(b)),
                    ) => assert_eq!(a, b),
                    (Err(a), Err(b)) => {
                        assert_eq!(a.to_string(), b.to_string());
                        bad += 1;
                    }
                    (a, b) => panic!("owned {a:?} / view {b:?} on {m:02x?}"),
                }
            }
        }
        assert!(ok > 100 && bad > 1000, "{ok} decoded, {bad} refused");
    }

    #[test]
    fn a_usage_view_reads_what_a_usage_record_reads() {
        let mut u2 = usage();
        u2.labels.insert("zone".into(), "b".into());
        u2.project = None;
        let w = Watermark {
            stage: "enricher".into(),
            source_partition: 0,
            source_partitions: 1,
            time: 7,
        };
        let mut rng = Rng(6);
        let (mut ok, mut bad) = (0, 0);
        for bytes in [encode(&usage()), encode(&u2), encode(&w)] {
            for m in mutants(&bytes, &mut rng, 5_000).into_iter().chain([bytes]) {
                let owned = crate::decode_usage_msg(&m);
                for keep in [true, false] {
                    match (&owned, crate::decode_usage_view(&m, keep)) {
                        (Ok(crate::UsageMsg::Usage(a)), Ok(crate::UsageViewMsg::Usage(v))) => {
                            let mut a = a.clone();
                            if !keep {
                                a.labels.clear();
                            }
                            assert_eq!(v.into_usage(), a);
                            ok += 1;
                        }
                        (
                            Ok(crate::UsageMsg::Watermark(a)),
                            Ok(crate::UsageViewMsg::Watermark(b)),
                        ) => {
                            assert_eq!(a, &b)
                        }
                        (Err(a), Err(b)) => {
                            assert_eq!(a.to_string(), b.to_string());
                            bad += 1;
                        }
                        (a, b) => panic!("owned {a:?} / view {b:?} on {m:02x?}"),
                    }
                }
            }
        }
        assert!(ok > 100 && bad > 1000, "{ok} decoded, {bad} refused");
    }

    #[test]
    fn the_direct_codec_agrees_with_apache_avro() {
        let mut s2 = sample();
        s2.memory_used_bytes = None;
        s2.owner_hint = Some("acmé".into());
        s2.ended = true;
        s2.seq = i64::MIN;
        s2.counters.cpu_time_ns = i64::MAX;
        differential(&[sample(), s2], 1);
        let hb = NodeHeartbeat {
            node_id: "n".into(),
            site: "s".into(),
            version: "0.1".into(),
            time: -5,
            instances: i32::MIN,
            retired: true,
        };
        differential(&[hb], 2);
        let mut u2 = usage();
        u2.labels.clear();
        u2.project = None;
        u2.flavor = Some("m1.small".into());
        u2.memory_used_byte_seconds = None;
        differential(&[usage(), u2], 3);
        let mut r2 = rated();
        r2.adjustment = true;
        r2.rule_version = i32::MAX;
        r2.amount = d("-0.000000001");
        differential(&[rated(), r2], 4);
        let w = Watermark {
            stage: "enricher".into(),
            source_partition: 1,
            source_partitions: 3,
            time: 1_700_000_000_000,
        };
        differential(&[w], 5);
        let inst = InstanceState {
            instance_id: "vm-0001".into(),
            node_id: "node-1".into(),
            site: "eu-1".into(),
            kind: "vm".into(),
            name: "web".into(),
            state: "running".into(),
            hypervisor: "test".into(),
            flavor: Some("m1.small".into()),
            vcpu_millis: 2000,
            memory_alloc_bytes: 4 << 30,
            first_seen: 1_700_000_000_000,
            last_seen: i64::MIN,
            labels: [("team".to_string(), "web".to_string())].into(),
        };
        let mut i2 = inst.clone();
        i2.flavor = None;
        i2.labels.clear();
        i2.vcpu_millis = i64::MAX;
        differential(&[inst, i2], 6);
        let audit = AuditCount {
            stage: "settler".into(),
            member: "settler-1".into(),
            topic: "meterflow.rated".into(),
            direction: "in".into(),
            bucket_start: 1_700_000_000_000,
            bucket_ms: 3_600_000,
            count: 1_260,
            quantity: "45.360000000".into(),
            sent_at: 1_700_000_123_456,
        };
        let mut a2 = audit.clone();
        a2.direction = "dup".into();
        a2.member = "ünïcode".into();
        a2.bucket_start = i64::MIN;
        a2.count = i64::MAX;
        a2.quantity = String::new();
        differential(&[audit, a2], 7);
        // several labels: apache-avro writes them in hash order, the direct codec in key
        // order; both read either
        let mut u3 = usage();
        for i in 0..5 {
            u3.labels.insert(format!("k{i}"), format!("v{i}"));
        }
        let ours = encode(&u3);
        assert_eq!(decode::<Usage>(&ours).expect("ours"), u3);
        assert_eq!(
            crate::generic::decode::<Usage>(&ours).expect("ours, by apache-avro"),
            u3
        );
        assert_eq!(
            decode::<Usage>(&crate::generic::encode(&u3)).expect("theirs"),
            u3
        );
    }
}
