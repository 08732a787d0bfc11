//! The product's own log lines, as `tracing` events: the supervisor's (into its bounded
//! `supervisor.log`), the hooks' and the wrapper's (stderr, which the engine keeps).
//! Each process serves one container, so its namespace and id are set once
//! ([`init`]) and added to every line; events add their own fields (`envoy_pid`,
//! `status`, ...).
//!
//! A small layer of our own formats the lines rather than `tracing-subscriber`'s `fmt`:
//! its JSON nests span fields under `"span"`, and log shippers want `namespace` and `id`
//! at the top level. `[log] journal = true` adds `tracing-journald`'s layer, with
//! `CONTAINER_ID`/`CONTAINER_NAMESPACE` on every entry.
//!
//! Text: `2026-12-07T18:16:35.123Z INFO supervisor: started Envoy pid 7 namespace=default id=c1 envoy_pid=7`
//! JSON: `{"time":..,"level":"info","component":"supervisor","namespace":..,"id":..,"msg":..,"envoy_pid":7}`

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};

use crate::sidecar::logfile::BoundedLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Threshold {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl Threshold {
    fn filter(self) -> tracing_subscriber::filter::LevelFilter {
        use tracing_subscriber::filter::LevelFilter as F;
        match self {
            Threshold::Error => F::ERROR,
            Threshold::Warn => F::WARN,
            Threshold::Info => F::INFO,
            Threshold::Debug => F::DEBUG,
            Threshold::Trace => F::TRACE,
        }
    }
}

/// Who writes: the word after the level on each line.
#[derive(Debug, Clone, Copy)]
pub enum Component {
    Supervisor,
    Hook,
    Wrapper,
    Metrics,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Component::Supervisor => "supervisor",
            Component::Hook => "hook",
            Component::Wrapper => "envoy-sidecar-runc",
            Component::Metrics => "metrics",
        }
    }
}

/// Where lines go.
#[derive(Clone)]
pub enum Sink {
    /// This process's stderr (hooks, wrapper: the engine keeps it).
    Stderr,
    /// The supervisor's bounded file once [`to_file`] set it; stderr before.
    File,
    /// A buffer (tests).
    Memory(Arc<Mutex<Vec<u8>>>),
}

/// The supervisor's own log, bounded (set by [`to_file`]).
static FILE: Mutex<Option<BoundedLog>> = Mutex::new(None);

/// From now on, [`Sink::File`] lines go to `log`.
pub fn to_file(log: BoundedLog) {
    *FILE.lock().unwrap_or_else(PoisonError::into_inner) = Some(log);
}

/// What `[log]` says about lines (its `max_file_kb` bounds the files, elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    pub format: Format,
    pub level: Threshold,
    pub journal: bool,
}

/// The container this process serves (empty strings when not known, e.g. a wrapper
/// command without an id).
#[derive(Debug, Clone, Default)]
pub struct Container {
    pub namespace: String,
    pub id: String,
}

/// Install the process-wide subscriber. Called once per process, early; a second call
/// (tests) keeps the first. A journal that cannot be reached is said on the other sink.
pub fn init(component: Component, settings: Settings, container: Container, sink: Sink) {
    let (subscriber, journal_err) = subscriber(component, settings, container, sink);
    if tracing::subscriber::set_global_default(subscriber).is_ok()
        && let Some(e) = journal_err
    {
        tracing::warn!("[log] journal = true, but the systemd journal is not reachable: {e}");
    }
}

type Built = Box<dyn Subscriber + Send + Sync>;

/// The subscriber [`init`] installs (separate for tests, which scope it).
pub fn subscriber(
    component: Component,
    settings: Settings,
    container: Container,
    sink: Sink,
) -> (Built, Option<std::io::Error>) {
    let (journal, err) = if settings.journal {
        match tracing_journald::layer() {
            Ok(l) => (
                Some(
                    l.with_syslog_identifier(crate::CLI_NAME.to_string())
                        .with_field_prefix(None)
                        .with_custom_fields([
                            ("CONTAINER_ID", container.id.as_str()),
                            ("CONTAINER_NAMESPACE", container.namespace.as_str()),
                            ("COMPONENT", component.as_str()),
                        ]),
                ),
                None,
            ),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let lines = Lines {
        component,
        format: settings.format,
        container,
        sink,
    };
    let s = tracing_subscriber::registry()
        .with(settings.level.filter())
        .with(lines)
        .with(journal);
    (Box::new(s), err)
}

/// The layer that writes our lines.
struct Lines {
    component: Component,
    format: Format,
    container: Container,
    sink: Sink,
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Lines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = match self.format {
            Format::Text => self.text(*event.metadata().level(), &fields),
            Format::Json => self.json(*event.metadata().level(), fields),
        };
        self.write(line.as_bytes());
    }
}

impl Lines {
    fn text(&self, level: Level, f: &Fields) -> String {
        let mut line = format!(
            "{} {} {}: {}",
            now(),
            level,
            self.component.as_str(),
            f.message
        );
        let c = &self.container;
        for (k, v) in [("namespace", &c.namespace), ("id", &c.id)] {
            if !v.is_empty() {
                let _ = write!(line, " {k}={}", quoted(v));
            }
        }
        for (k, v) in &f.fields {
            let v = match v {
                serde_json::Value::String(s) => quoted(s),
                other => other.to_string(),
            };
            let _ = write!(line, " {k}={v}");
        }
        line.push('\n');
        line
    }

    fn json(&self, level: Level, f: Fields) -> String {
        let mut m = serde_json::Map::new();
        m.insert("time".into(), now().into());
        m.insert("level".into(), level.as_str().to_lowercase().into());
        m.insert("component".into(), self.component.as_str().into());
        let c = &self.container;
        for (k, v) in [("namespace", &c.namespace), ("id", &c.id)] {
            if !v.is_empty() {
                m.insert(k.into(), v.clone().into());
            }
        }
        m.insert("msg".into(), f.message.into());
        for (k, v) in f.fields {
            m.entry(k).or_insert(v);
        }
        let mut line = serde_json::Value::Object(m).to_string();
        line.push('\n');
        line
    }

    fn write(&self, bytes: &[u8]) {
        match &self.sink {
            Sink::Stderr => {
                let _ = std::io::stderr().write_all(bytes);
            }
            Sink::File => {
                let mut f = FILE.lock().unwrap_or_else(PoisonError::into_inner);
                match f.as_mut() {
                    Some(f) => {
                        let _ = f.write(bytes);
                    }
                    None => {
                        let _ = std::io::stderr().write_all(bytes);
                    }
                }
            }
            Sink::Memory(buf) => buf
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A text value as is when it is one plain word, else quoted (logfmt).
fn quoted(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=')
    {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

/// An event's message and other fields, in the order given.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, serde_json::Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.message = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.push((field.name().to_string(), v));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(settings: Settings, f: impl FnOnce()) -> String {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let container = Container {
            namespace: "default".into(),
            id: "c1".into(),
        };
        let (s, err) = subscriber(
            Component::Supervisor,
            settings,
            container,
            Sink::Memory(buf.clone()),
        );
        assert!(err.is_none());
        tracing::subscriber::with_default(s, f);
        let out = buf.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lines_carry_the_level_the_container_and_the_fields() {
        let out = capture(Settings::default(), || {
            tracing::info!(envoy_pid = 42, "started Envoy pid {}", 42);
            tracing::warn!(
                status = "degraded",
                reason = "no network: x",
                "status: degraded"
            );
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].ends_with(
                " INFO supervisor: started Envoy pid 42 namespace=default id=c1 envoy_pid=42"
            ),
            "{out}"
        );
        assert!(
            lines[0].starts_with("20") && lines[0].contains('T'),
            "{out}"
        );
        assert!(
            lines[1].ends_with(
                " WARN supervisor: status: degraded namespace=default id=c1 status=degraded reason=\"no network: x\""
            ),
            "{out}"
        );
    }

    #[test]
    fn json_lines_put_the_container_and_the_fields_at_the_top_level() {
        let s = Settings {
            format: Format::Json,
            ..Settings::default()
        };
        let out = capture(s, || {
            tracing::error!(
                envoy_pid = 7_i64,
                ok = false,
                "Envoy pid 7 exited: \"x\"\nnext"
            );
        });
        assert_eq!(
            out.lines().count(),
            1,
            "one line whatever the message holds: {out}"
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["component"], "supervisor");
        assert_eq!(v["namespace"], "default");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["msg"], "Envoy pid 7 exited: \"x\"\nnext");
        assert_eq!(v["envoy_pid"], 7);
        assert_eq!(v["ok"], false);
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
    }

    #[test]
    fn the_level_threshold_drops_what_is_below_it() {
        let s = Settings {
            level: Threshold::Warn,
            ..Settings::default()
        };
        let out = capture(s, || {
            tracing::debug!("d");
            tracing::info!("i");
            tracing::warn!("w");
            tracing::error!("e");
        });
        let msgs: Vec<&str> = out
            .lines()
            .map(|l| l.split(": ").nth(1).unwrap().split(' ').next().unwrap())
            .collect();
        assert_eq!(msgs, ["w", "e"], "{out}");
        let all = capture(
            Settings {
                level: Threshold::Trace,
                ..Settings::default()
            },
            || tracing::trace!("t"),
        );
        assert!(all.contains(" TRACE supervisor: t"), "{all}");
    }

    #[test]
    fn an_unknown_container_adds_no_empty_fields() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (s, _) = subscriber(
            Component::Wrapper,
            Settings::default(),
            Container::default(),
            Sink::Memory(buf.clone()),
        );
        tracing::subscriber::with_default(s, || tracing::warn!("no id"));
        let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(
            out.trim_end().ends_with(" WARN envoy-sidecar-runc: no id"),
            "{out}"
        );
    }

    #[test]
    fn logfmt_quoting() {
        assert_eq!(quoted("abc"), "abc");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted("a=b"), "\"a=b\"");
        assert_eq!(quoted(""), "\"\"");
    }
}
