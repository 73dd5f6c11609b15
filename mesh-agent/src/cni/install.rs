//! Installing the plugin on a node (`mesh-agent cni install`, run by the DaemonSet) and
//! removing it (`mesh-agent cni uninstall`): the binary into the CNI bin directory, and an
//! entry at the end of the plugins of the node's first conflist. Both are idempotent and
//! replace files atomically (a temporary file, then a rename), since the runtime may read them
//! at any moment.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use super::PLUGIN_TYPE;

/// Errors of install and uninstall, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no CNI network configuration list (*.conflist) in {dir}: the primary CNI plugin has not \
         written one yet (wait for it), or writes a single-plugin *.conf, which a chained plugin \
         cannot join (configure the primary plugin to write a conflist)"
    )]
    NoConflist { dir: PathBuf },
    #[error("{path} is not a CNI conflist: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The conflist the runtime uses: the first `*.conflist` by name.
pub fn primary_conflist(conf_dir: &Path) -> Result<PathBuf, Error> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| Error::NoConflist {
        dir: conf_dir.to_owned(),
    })
}

/// Copies `binary` to `<bin_dir>/mesh-agent-cni` and puts the plugin, asking on `socket`, at
/// the end of the primary conflist's plugins (replacing an entry of an earlier install).
/// Returns the conflist changed.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
) -> Result<PathBuf, Error> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = std::fs::read(binary).map_err(io(binary))?;
    write_atomic(&target, &bytes, 0o755)?;
    let path = primary_conflist(conf_dir)?;
    let mut list = read_list(&path)?;
    let plugins = plugins(&mut list, &path)?;
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(json!({"type": PLUGIN_TYPE, "socket": socket}));
    write_list(&path, &list)?;
    Ok(path)
}

/// Puts the plugin back at the end of the primary conflist's plugins when it is missing (the
/// primary CNI rewrote its conflist, or a new one sorts first); returns the conflist changed,
/// if any. Changes nothing when the plugin is listed.
pub fn ensure_listed(conf_dir: &Path, socket: &Path) -> Result<Option<PathBuf>, Error> {
    let path = primary_conflist(conf_dir)?;
    let mut list = read_list(&path)?;
    let plugins = plugins(&mut list, &path)?;
    if plugins.iter().any(|p| p["type"] == PLUGIN_TYPE) {
        return Ok(None);
    }
    plugins.push(json!({"type": PLUGIN_TYPE, "socket": socket}));
    write_list(&path, &list)?;
    Ok(Some(path))
}

/// Keeps the plugin in the node's primary conflist: checks every `every` and puts it back
/// when the primary CNI dropped it (its own upgrade rewrites the file), logged and counted.
/// Pods created in between start before the agent knows (the manager's retry finds them once
/// they run): the check is frequent for that reason.
pub async fn keep_listed(
    conf_dir: PathBuf,
    socket: PathBuf,
    every: std::time::Duration,
    repairs: prometheus_client::metrics::counter::Counter,
) {
    let mut last_error = None;
    loop {
        match ensure_listed(&conf_dir, &socket) {
            Ok(Some(path)) => {
                tracing::warn!(conflist = %path.display(), "the CNI plugin was missing from the node's conflist (the primary CNI rewrote it?): put back");
                repairs.inc();
                last_error = None;
            }
            Ok(None) => last_error = None,
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "checking that the CNI plugin is in the node's conflist failed; will retry");
                    last_error = Some(message);
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Removes the plugin from every conflist of `conf_dir` and its binary from `bin_dir`.
/// Returns the conflists changed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    let entries = std::fs::read_dir(conf_dir).map_err(io(conf_dir))?;
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "conflist") {
            continue;
        }
        let mut list = read_list(&path)?;
        let plugins = plugins(&mut list, &path)?;
        let before = plugins.len();
        plugins.retain(|p| p["type"] != PLUGIN_TYPE);
        if plugins.len() != before {
            write_list(&path, &list)?;
            changed.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&binary)(e)),
    }
    Ok(changed)
}

fn read_list(path: &Path) -> Result<Value, Error> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| Error::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn plugins<'a>(list: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, Error> {
    list.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Error::Invalid {
            path: path.to_owned(),
            message: "no `plugins` list".into(),
        })
}

fn write_list(path: &Path, list: &Value) -> Result<(), Error> {
    let mut text = serde_json::to_vec_pretty(list).map_err(|e| Error::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    text.push(b'\n');
    write_atomic(path, &text, 0o644)
}

/// Writes `bytes` to a temporary file beside `path` (a name no runtime reads: no `.conf`,
/// `.conflist` or `.json` suffix), then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.mesh-agent-tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.1.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn install_appends_once_and_uninstall_restores_the_list() {
        let d = std::env::temp_dir().join(format!("mesh-cni-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let (bin, conf) = (d.join("bin"), d.join("net.d"));
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::create_dir_all(&conf).expect("mkdir");
        let e = install(Path::new("/proc/self/exe"), &bin, &conf, Path::new("/s"))
            .expect_err("no conflist yet");
        assert!(
            e.to_string().contains("no CNI network configuration list"),
            "{e}"
        );
        std::fs::write(conf.join("10-bridge.conflist"), LIST).expect("writing the list");
        std::fs::write(conf.join("20-other.conflist"), LIST).expect("writing another list");
        for _ in 0..2 {
            let changed = install(Path::new("/proc/self/exe"), &bin, &conf, Path::new("/s"))
                .expect("install");
            assert_eq!(changed, conf.join("10-bridge.conflist"));
        }
        let list = read_list(&conf.join("10-bridge.conflist")).expect("read");
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        assert_eq!(list["plugins"][2]["socket"], "/s");
        assert!(bin.join(PLUGIN_TYPE).is_file());
        let other = read_list(&conf.join("20-other.conflist")).expect("read");
        assert_eq!(other, serde_json::from_str::<Value>(LIST).expect("LIST"));
        let changed = uninstall(&bin, &conf).expect("uninstall");
        assert_eq!(changed, vec![conf.join("10-bridge.conflist")]);
        assert_eq!(
            read_list(&conf.join("10-bridge.conflist")).expect("read"),
            serde_json::from_str::<Value>(LIST).expect("LIST")
        );
        assert!(!bin.join(PLUGIN_TYPE).exists());
        assert!(uninstall(&bin, &conf).expect("again").is_empty());
        // The primary CNI rewrites its list: the agent puts the plugin back, once.
        assert_eq!(
            ensure_listed(&conf, Path::new("/s")).expect("ensure"),
            Some(conf.join("10-bridge.conflist"))
        );
        assert_eq!(ensure_listed(&conf, Path::new("/s")).expect("again"), None);
        let list = read_list(&conf.join("10-bridge.conflist")).expect("read");
        assert_eq!(list["plugins"][2]["type"], PLUGIN_TYPE);
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
