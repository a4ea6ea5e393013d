//! Settings layering for the binary's servers: a component's own config struct
//! (`RaftNodeConfig`, `NameServerConfig`) is filled from its documented defaults,
//! then a TOML file, then `RAFTMQ_*` environment variables, then flags, all by the
//! struct's serde names, and then validates itself. One name and one home per
//! setting: no second struct per source to keep in step by hand.
//!
//! The layers are merged as TOML tables and deserialized once, so an error names
//! the setting's key and where its value came from. Environment values carry no
//! type, so each is read as the type the key's default has (a number, a boolean,
//! a comma-separated list, or text). A key no struct field takes is an error in
//! the file and on the command line; in the environment it is ignored with a
//! warning, because the environment holds other programs' `RAFTMQ_*` variables
//! too (scripts' `RAFTMQ_BIN`, compose's `RAFTMQ_LOG`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Where a setting's value came from, named in errors.
#[derive(Clone, Debug, PartialEq)]
enum Source {
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "in {}", p.display()),
            Source::Env(var) => write!(f, "from environment variable {var}"),
            Source::Flag(flag) => write!(f, "from flag {flag}"),
        }
    }
}

/// How a key kept for compatibility maps onto its current one.
#[derive(Clone, Copy, Debug)]
pub enum Legacy {
    /// Same value under another key.
    Renamed(&'static str),
    /// A number of milliseconds, now a duration setting (`"250ms"`).
    Millis(&'static str),
}

/// The layers of one component's settings, merged in precedence order.
pub struct Layers {
    /// The defaults, serialized: the type of every key that has one.
    defaults: Table,
    merged: Table,
    sources: BTreeMap<String, Source>,
    env_prefix: &'static str,
    legacy: &'static [(&'static str, Legacy)],
}

impl Layers {
    /// Starts from `defaults` (not merged: the struct's own `Default` fills what
    /// no layer sets). `env_prefix` is e.g. `RAFTMQ_`; `legacy` lists old keys.
    pub fn new<T: Serialize>(
        defaults: &T,
        env_prefix: &'static str,
        legacy: &'static [(&'static str, Legacy)],
    ) -> anyhow::Result<Layers> {
        let defaults = Table::try_from(defaults).context("serializing the default settings")?;
        Ok(Layers {
            defaults,
            merged: Table::new(),
            sources: BTreeMap::new(),
            env_prefix,
            legacy,
        })
    }

    /// Merges a TOML file.
    pub fn file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let table: Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut leaves = Vec::new();
        flatten(&table, &mut Vec::new(), &mut leaves);
        for (key, value) in leaves {
            self.put(&key, value, Source::File(path.to_owned()))?;
        }
        Ok(())
    }

    /// Merges every `<prefix>KEY` variable of `vars` (`<prefix>TABLE__KEY` for a
    /// key of a table), except the lower-cased keys in `skip` (variables read
    /// elsewhere, such as the config file's path or a secret).
    pub fn env(&mut self, vars: impl IntoIterator<Item = (String, String)>, skip: &[&str]) -> anyhow::Result<()> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(self.env_prefix))
            .collect();
        // Deterministic order, so a table and one of its keys set together merge alike on every run.
        vars.sort();
        for (name, raw) in vars {
            let key = name[self.env_prefix.len()..].to_ascii_lowercase().replace("__", ".");
            if key.is_empty() || skip.contains(&key.as_str()) {
                continue;
            }
            let value = self
                .typed(&key, &raw)
                .with_context(|| format!("environment variable {name}"))?;
            self.put(&key, value, Source::Env(name.clone()))?;
        }
        Ok(())
    }

    /// Merges one typed flag's value (`flag` is how the user wrote it).
    pub fn flag(&mut self, key: &str, value: impl Into<Value>, flag: &str) -> anyhow::Result<()> {
        self.put(key, value.into(), Source::Flag(flag.to_owned()))
    }

    /// Merges `--set KEY=VALUE`, the value read as the key's default type.
    pub fn set(&mut self, assignment: &str) -> anyhow::Result<()> {
        let (key, raw) = assignment
            .split_once('=')
            .with_context(|| format!("--set {assignment:?} is not KEY=VALUE"))?;
        let key = key.trim();
        let value = self
            .typed(key, raw.trim())
            .with_context(|| format!("--set {assignment}"))?;
        self.put(key, value, Source::Flag(format!("--set {assignment}")))
    }

    /// Whether any layer set `key`.
    pub fn is_set(&self, key: &str) -> bool {
        lookup(&self.merged, key).is_some()
    }

    /// Deserializes the merged layers into `T`, over `T`'s defaults. The error
    /// names the key and where its value came from.
    pub fn extract<T: DeserializeOwned>(mut self) -> anyhow::Result<T> {
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let merged = std::mem::take(&mut self.merged);
        let ignored = serde_ignored::Deserializer::new(Value::Table(merged), &mut note);
        let value: T = serde_path_to_error::deserialize(ignored).map_err(|e| {
            let key = e.path().to_string();
            let from = self.source_of(&key).map(|s| format!(" ({s})")).unwrap_or_default();
            // toml's message ends with its own "in `key`" line; the key is named already.
            let inner = e.inner().to_string();
            let reason = inner.lines().next().unwrap_or_default().trim().to_owned();
            anyhow!("invalid setting {key}{from}: {reason}")
        })?;
        for key in unknown {
            match self.source_of(&key) {
                Some(Source::Env(var)) => {
                    tracing::warn!(%var, "ignoring an environment variable that names no setting")
                }
                Some(source) => bail!("unknown setting {key} ({source}); `--print-config` lists every key"),
                None => bail!("unknown setting {key}; `--print-config` lists every key"),
            }
        }
        Ok(value)
    }

    /// The source of `key` or of the nearest enclosing key that has one.
    fn source_of(&self, key: &str) -> Option<&Source> {
        let mut k = key;
        loop {
            if let Some(s) = self.sources.get(k) {
                return Some(s);
            }
            k = k.rsplit_once('.')?.0;
        }
    }

    /// `raw` read as the type of `key`'s default; text for keys with no default
    /// (unset optional settings), unless it reads as a whole number or a boolean.
    fn typed(&self, key: &str, raw: &str) -> anyhow::Result<Value> {
        let parse_int = |s: &str| s.parse::<i64>().map(Value::Integer);
        let parse_bool = |s: &str| match s {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err(anyhow!("{s:?} is not true or false")),
        };
        let key = match self.legacy.iter().find(|(old, _)| *old == key) {
            Some((_, Legacy::Millis(_))) => {
                return parse_int(raw)
                    .map_err(|e| anyhow!("{key}: {raw:?} is not a whole number of milliseconds: {e}"));
            }
            Some((_, Legacy::Renamed(new))) => new,
            None => key,
        };
        Ok(match lookup(&self.defaults, key) {
            Some(Value::Integer(_)) => {
                parse_int(raw).map_err(|e| anyhow!("{key}: {raw:?} is not a whole number: {e}"))?
            }
            Some(Value::Boolean(_)) => parse_bool(raw).with_context(|| key.to_owned())?,
            Some(Value::Float(_)) => Value::Float(
                raw.parse()
                    .map_err(|e| anyhow!("{key}: {raw:?} is not a number: {e}"))?,
            ),
            Some(Value::Array(_)) => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
            Some(Value::Table(_)) => bail!("{key} is a table: set its keys one by one ({key}.KEY)"),
            Some(_) => Value::String(raw.to_owned()),
            None => parse_int(raw)
                .or_else(|_| parse_bool(raw))
                .unwrap_or_else(|_| Value::String(raw.to_owned())),
        })
    }

    /// Sets one leaf, creating tables on the way; later layers replace earlier ones.
    fn put(&mut self, key: &str, value: Value, source: Source) -> anyhow::Result<()> {
        let (key, value) = match self.legacy.iter().find(|(old, _)| *old == key) {
            Some((_, Legacy::Renamed(new))) => ((*new).to_owned(), value),
            Some((_, Legacy::Millis(new))) => {
                let ms = value
                    .as_integer()
                    .with_context(|| format!("{key} ({source}) must be a whole number of milliseconds"))?;
                ((*new).to_owned(), Value::String(format!("{ms}ms")))
            }
            None => (key.to_owned(), value),
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().context("empty setting key")?;
        let mut table = &mut self.merged;
        let mut path = String::new();
        for part in parts {
            path = if path.is_empty() {
                part.to_owned()
            } else {
                format!("{path}.{part}")
            };
            let entry = table
                .entry(part.to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            table = match entry {
                Value::Table(t) => t,
                _ => bail!("{path} is not a table, so {key} ({source}) cannot be set"),
            };
        }
        table.insert(leaf.to_owned(), value);
        self.sources.insert(key, source);
        Ok(())
    }
}

/// Every leaf of `table` as (dotted key, value); arrays are leaves.
fn flatten(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<(String, Value)>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            Value::Table(t) => flatten(t, prefix, out),
            leaf => out.push((prefix.join("."), leaf.clone())),
        }
        prefix.pop();
    }
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq, Default)]
    #[serde(default)]
    struct Inner {
        #[serde(with = "humantime_serde")]
        wait: Duration,
        on: bool,
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    #[serde(default)]
    struct Demo {
        id: u64,
        name: String,
        list: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        opt: Option<String>,
        inner: Inner,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                id: 7,
                name: "x".into(),
                list: vec![],
                opt: None,
                inner: Inner {
                    wait: Duration::from_secs(1),
                    on: false,
                },
            }
        }
    }

    const LEGACY: &[(&str, Legacy)] = &[
        ("old_wait_ms", Legacy::Millis("inner.wait")),
        ("on", Legacy::Renamed("inner.on")),
    ];

    fn layers() -> Layers {
        Layers::new(&Demo::default(), "T_", LEGACY).unwrap()
    }

    fn file(text: &str) -> (tempfile::NamedTempFile, PathBuf) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let p = f.path().to_owned();
        (f, p)
    }

    #[test]
    fn later_layers_win_and_env_values_take_the_default_type() {
        let (_f, path) = file("id = 1\nname = \"file\"\n[inner]\nwait = \"5s\"\n");
        let mut l = layers();
        l.file(&path).unwrap();
        l.env(
            [
                ("T_ID".to_owned(), "2".to_owned()),
                ("T_LIST".to_owned(), "a:1, b:2".to_owned()),
                ("T_INNER__ON".to_owned(), "true".to_owned()),
                ("OTHER".to_owned(), "9".to_owned()),
            ],
            &[],
        )
        .unwrap();
        l.flag("name", "flag", "--name").unwrap();
        let d: Demo = l.extract().unwrap();
        assert_eq!(
            d,
            Demo {
                id: 2,
                name: "flag".into(),
                list: vec!["a:1".into(), "b:2".into()],
                opt: None,
                inner: Inner {
                    wait: Duration::from_secs(5),
                    on: true
                },
            }
        );
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let mut l = layers();
        l.env([("T_ID".to_owned(), "seven".to_owned())], &[]).unwrap_err();
        let (_f, path) = file("[inner]\nwait = 5\n");
        let mut l = layers();
        l.file(&path).unwrap();
        let err = l.extract::<Demo>().unwrap_err().to_string();
        assert!(
            err.contains("inner.wait") && err.contains(&path.display().to_string()),
            "{err}"
        );
        let (_f, path) = file("nmae = \"typo\"\n");
        let mut l = layers();
        l.file(&path).unwrap();
        let err = l.extract::<Demo>().unwrap_err().to_string();
        assert!(err.contains("unknown setting nmae"), "{err}");
    }

    #[test]
    fn unknown_environment_variables_are_ignored_and_legacy_keys_map() {
        let (_f, path) = file("old_wait_ms = 250\non = true\n");
        let mut l = layers();
        l.file(&path).unwrap();
        l.env([("T_BIN".to_owned(), "/usr/bin/x".to_owned())], &[]).unwrap();
        l.set("opt=hello").unwrap();
        let d: Demo = l.extract().unwrap();
        assert_eq!(d.inner.wait, Duration::from_millis(250));
        assert!(d.inner.on);
        assert_eq!(d.opt.as_deref(), Some("hello"));
        let mut l = layers();
        assert!(l.set("inner=3").is_err(), "a table is not a value");
        assert!(l.set("novalue").is_err());
    }
}
