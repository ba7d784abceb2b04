//! Where settlement files go, through the `object_store` crate: a local directory, or
//! S3-compatible object storage (`s3://bucket/prefix`, with the default `s3` feature), or
//! memory (`memory://`, for tests).
//!
//! Paths are relative to the location's root and use `/`: `period=2026-03/entity=acme/
//! manifest.json`. Every object is written whole (object stores have no partial object;
//! the local store writes a staging file, syncs it and renames it into place, so a name
//! never points at bytes not yet on disk). Manifests, markers and lines are plain puts;
//! period indexes are *created* (`PutMode::Create`: a hard link locally,
//! `If-None-Match: *` on S3), so two masters can never both write one. On a local
//! directory each write is also made durable, which `object_store` leaves out: the
//! file, its directory and every directory above it up to the root (a directory created
//! for it is durable only once its own entry is), side by side, so a version is on disk
//! before the offsets that produced it are committed. A version's data files are
//! synced, and their directory, before its manifest is written (`put_sets`, one
//! blocking task a set).
//! Only the `announced` markers are left unsynced (`mark_all`, a batch's markers on one
//! blocking task): losing one repeats an announcement, which is safe to repeat.
//!
//! A local directory opened with the storage option `sync = "filesystem"` (Linux) makes
//! a batch of file sets durable with one `syncfs` of its filesystem a phase instead of
//! an fsync a file and directory (`LocalSync`): every data file of the batch staged,
//! the filesystem synced, the data files renamed into place and every manifest staged,
//! synced again, the manifests renamed into place, synced a third time. The same order
//! holds (a manifest exists only once the files it lists are durable, a name never
//! points at bytes not yet on disk), at three syncs a batch; but a `syncfs` writes out
//! everything dirty on that filesystem, other programs' writes too, so it is for a
//! settlement directory on a filesystem of its own.

use anyhow::{bail, Context, Result};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file set: its data files, then its manifest (relative paths and bytes).
pub type FileSet = (Vec<(String, Vec<u8>)>, (String, Vec<u8>));

#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// A local directory's absolute path (writes there are fsynced).
    local: Option<PathBuf>,
    /// How a local directory's file sets are made durable.
    sync: LocalSync,
    location: String,
}

/// How a local directory makes a batch of file sets durable (the storage option
/// `sync`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalSync {
    /// `each` (the default): fsync every file and directory written, the sets side by
    /// side. Right on any filesystem, shared or not.
    #[default]
    Each,
    /// `filesystem` (Linux): one `syncfs` of the directory's filesystem a phase of the
    /// batch, three a batch, whatever its number of files. It writes out every dirty
    /// page of that filesystem, so it is for a settlement directory on a filesystem of
    /// its own (beside a broker's log it waits for the broker's writes too).
    Filesystem,
}

impl std::str::FromStr for LocalSync {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<LocalSync> {
        match s {
            "each" => Ok(LocalSync::Each),
            "filesystem" if cfg!(target_os = "linux") => Ok(LocalSync::Filesystem),
            "filesystem" => bail!("sync = \"filesystem\" needs Linux (syncfs)"),
            other => bail!("sync = {other:?}: use \"each\" or \"filesystem\""),
        }
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location)
    }
}

impl Store {
    /// A settlement location: a directory path, `file:///abs/path`, `s3://bucket/prefix`
    /// or `memory://`. S3 is configured from the standard `AWS_*` environment variables,
    /// then from `options` (`aws_endpoint`, `aws_region`, `aws_allow_http`,
    /// `aws_access_key_id`, ...; an unknown key is an error).
    pub fn open(location: &str, options: &BTreeMap<String, String>) -> Result<Store> {
        match location.split_once("://") {
            None => Store::local_with(Path::new(location), options),
            Some(("file", path)) => Store::local_with(Path::new(path), options),
            Some(("memory", _)) => Ok(Store {
                inner: Arc::new(object_store::memory::InMemory::new()),
                prefix: ObjPath::default(),
                local: None,
                sync: LocalSync::Each,
                location: location.to_string(),
            }),
            Some(("s3", rest)) => s3(location, rest, options),
            Some((scheme, _)) => bail!(
                "settlement location {location:?}: unknown scheme {scheme:?} (use a directory, file://, s3:// or memory://)"
            ),
        }
    }

    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Store> {
        Store::local_with(dir, &BTreeMap::new())
    }

    /// A local directory with storage options: `sync` (`each` or `filesystem`, see
    /// `LocalSync`) is the only one; any other is an error.
    pub fn local_with(dir: &Path, options: &BTreeMap<String, String>) -> Result<Store> {
        let mut sync = LocalSync::Each;
        for (k, v) in options {
            match k.as_str() {
                "sync" => sync = v.parse().with_context(|| format!("storage option {k:?}"))?,
                _ => {
                    bail!("storage option {k:?}: a local settlement directory takes only \"sync\"")
                }
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let abs = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Store {
            inner: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&abs)?),
            prefix: ObjPath::default(),
            local: Some(abs),
            sync,
            location: dir.display().to_string(),
        })
    }

    /// How a local directory's file sets are made durable (`Each` for object stores).
    pub fn sync(&self) -> LocalSync {
        self.sync
    }

    /// The local directory behind this store, if it is one.
    pub fn local_root(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// Where `rel` is, for people: a file path or an object URL.
    pub fn describe(&self, rel: &str) -> String {
        match &self.local {
            Some(root) => root.join(rel).display().to_string(),
            None => format!("{}/{rel}", self.location.trim_end_matches('/')),
        }
    }

    fn path(&self, rel: &str) -> ObjPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// Make the directories holding `rels` durable (a local directory only; object
    /// stores are durable on return): each directory once, side by side, and every
    /// directory above up to the root, so a directory created for them is durable too
    /// (its entry is in its parent). The files themselves were synced before they were
    /// renamed into place (`write_durable`).
    pub async fn sync_dirs(&self, rels: &[&str]) -> Result<()> {
        let Some(root) = self.local.clone() else {
            return Ok(());
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for rel in rels {
            let mut d = root.join(rel);
            while d.pop() && d.starts_with(&root) {
                if !dirs.contains(&d) {
                    dirs.push(d.clone());
                }
            }
        }
        sync_paths(dirs).await
    }

    async fn write(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.inner
            .put(&self.path(rel), PutPayload::from(bytes))
            .await
            .with_context(|| format!("writing {}", self.describe(rel)))?;
        Ok(())
    }

    /// Write `rel` whole, replacing what was there, and make it durable with every
    /// directory above it.
    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.put_all(vec![(rel.to_string(), bytes)]).await
    }

    /// Write several files whole, side by side, each durable before it replaces what
    /// was there (see `write_files`), then make the directories holding them durable,
    /// each once (not one directory sync per file), and every directory above up to the
    /// root (see `put`).
    pub async fn put_all(&self, files: Vec<(String, Vec<u8>)>) -> Result<()> {
        let rels: Vec<String> = files.iter().map(|(r, _)| r.clone()).collect();
        self.write_files(files).await?;
        let rels: Vec<&str> = rels.iter().map(String::as_str).collect();
        self.sync_dirs(&rels).await
    }

    /// Write several files whole, side by side. On a local directory each goes to a
    /// staging file beside it, is synced, then renamed into place, one blocking task a
    /// file: its bytes are durable before its name points at them, so a crash leaves
    /// the old file or the whole new one, never a name with bytes missing. The rename
    /// itself is durable once the directory is synced (`put_all`, `sync_dirs`).
    pub async fn write_files(&self, files: Vec<(String, Vec<u8>)>) -> Result<()> {
        let Some(root) = self.local.clone() else {
            futures::future::try_join_all(
                files
                    .into_iter()
                    .map(|(r, b)| async move { self.write(&r, b).await }),
            )
            .await?;
            return Ok(());
        };
        futures::future::try_join_all(files.into_iter().map(|(rel, bytes)| {
            let path = root.join(&rel);
            async move {
                let p = path.clone();
                tokio::task::spawn_blocking(move || write_durable(&p, &bytes))
                    .await?
                    .with_context(|| format!("writing {}", path.display()))
            }
        }))
        .await?;
        Ok(())
    }

    /// Write file sets, each its data files and then its manifest, so that a manifest
    /// exists only once the files it lists are durable. On a local directory, one
    /// blocking task a set (not one a file: the hand-offs to and from the blocking
    /// threads cost as much as the writes): its data files, each synced before it is
    /// renamed into place; their directory synced; the manifest the same way and its
    /// directory again. The sets run side by side, then every directory above them up
    /// to the root is synced once. With `sync = "filesystem"`, the whole batch on one
    /// blocking task in three phases, each ended by one `syncfs` (see `LocalSync`). An
    /// object store's writes are durable on return: every data file, then every
    /// manifest.
    pub async fn put_sets(&self, sets: Vec<FileSet>) -> Result<()> {
        let Some(root) = self.local.clone() else {
            let (data, manifests): (Vec<_>, Vec<_>) = sets.into_iter().unzip();
            self.write_files(data.into_iter().flatten().collect())
                .await?;
            return self.write_files(manifests).await;
        };
        #[cfg(target_os = "linux")]
        if self.sync == LocalSync::Filesystem {
            return tokio::task::spawn_blocking(move || {
                write_sets_syncing_the_filesystem(&root, sets)
            })
            .await?;
        }
        let mut dirs: Vec<String> = Vec::new();
        for (_, (rel, _)) in &sets {
            let dir = rel.rsplit_once('/').map_or("", |(d, _)| d);
            if !dir.is_empty() && !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_string());
            }
        }
        futures::future::try_join_all(sets.into_iter().map(|set| {
            let root = root.clone();
            async move { tokio::task::spawn_blocking(move || write_set(&root, set)).await? }
        }))
        .await?;
        let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        self.sync_dirs(&dirs).await
    }

    /// Create empty files (markers) without syncing them: only for files whose loss
    /// after a crash repeats work that is safe to repeat (a version's `announced`
    /// marker: without it the version is announced again, with the same entity, period
    /// and version). On a local directory all of them on one blocking task, each
    /// created in place (an empty file has no bytes to tear, so no staging file);
    /// on an object store side by side.
    pub async fn mark_all(&self, rels: &[String]) -> Result<()> {
        if rels.is_empty() {
            return Ok(());
        }
        let Some(root) = self.local.clone() else {
            futures::future::try_join_all(rels.iter().map(|r| self.write(r, Vec::new()))).await?;
            return Ok(());
        };
        let paths: Vec<PathBuf> = rels.iter().map(|r| root.join(r)).collect();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for path in &paths {
                create_empty(path).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        })
        .await?
    }

    /// Create `rel` unless it exists: false if it did (another writer was first).
    pub async fn create(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&self.path(rel), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {
                // object_store links a staging file it did not sync: sync the file too
                if let Some(root) = &self.local {
                    sync_paths(vec![root.join(rel)]).await?;
                }
                self.sync_dirs(&[rel]).await?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating {}", self.describe(rel))),
        }
    }

    /// The bytes of `rel`, None if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self.inner.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .with_context(|| format!("reading {}", self.describe(rel)))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.describe(rel))),
        }
    }

    pub async fn exists(&self, rel: &str) -> Result<bool> {
        match self.inner.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("looking up {}", self.describe(rel))),
        }
    }

    /// The names of the "directories" directly under `rel` (common prefixes), sorted.
    pub async fn dirs(&self, rel: &str) -> Result<Vec<String>> {
        let p = self.path(rel);
        let prefix = (!p.as_ref().is_empty()).then_some(&p);
        let listed = match self.inner.list_with_delimiter(prefix).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.describe(rel))),
        };
        let mut v: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|d| d.filename().map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(feature = "s3")]
fn s3(location: &str, rest: &str, options: &BTreeMap<String, String>) -> Result<Store> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("settlement location {location:?} names no bucket");
    }
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (k, v) in options {
        let key: AmazonS3ConfigKey = k
            .to_ascii_lowercase()
            .parse()
            .with_context(|| format!("storage option {k:?}"))?;
        b = b.with_config(key, v.clone());
    }
    Ok(Store {
        inner: Arc::new(b.build().with_context(|| format!("opening {location}"))?),
        prefix: ObjPath::parse(prefix).with_context(|| format!("prefix of {location}"))?,
        local: None,
        sync: LocalSync::Each,
        location: location.to_string(),
    })
}

#[cfg(not(feature = "s3"))]
fn s3(location: &str, _: &str, _: &BTreeMap<String, String>) -> Result<Store> {
    bail!("settlement location {location:?}: this build has no S3 support (build with the `s3` feature)")
}

/// Create `path` empty (or empty it), creating missing directories; not synced.
fn create_empty(path: &Path) -> std::io::Result<()> {
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    };
    match open() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            open().map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Write `path` whole through a staging file beside it (`name#n`, the staging name
/// `object_store` uses and leaves out of listings), synced before it is renamed into
/// place; missing directories are created.
fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let staging = stage(path, bytes, true)?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(())
}

/// Write `bytes` to a new staging file beside `path` (`name#n`, the first free `n`),
/// synced if `sync`; missing directories are created. Its path, for the rename.
fn stage(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<PathBuf> {
    use std::io::{ErrorKind, Write};
    let mut n = 1u32;
    let mut made_dirs = false;
    let (mut file, staging) = loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = PathBuf::from(staging);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(f) => break (f, staging),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
            // (another writer may create it meanwhile: create_dir_all takes that)
            Err(e) if e.kind() == ErrorKind::NotFound && !made_dirs => match path.parent() {
                Some(dir) => {
                    std::fs::create_dir_all(dir)?;
                    made_dirs = true;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
    drop(file);
    match written {
        Ok(()) => Ok(staging),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// A batch of file sets made durable with one `syncfs` a phase (`LocalSync::Filesystem`):
/// every data file staged, synced, renamed into place with every manifest staged,
/// synced, the manifests renamed into place, synced. On an error no manifest of the
/// batch is in place and no staging file is left.
#[cfg(target_os = "linux")]
fn write_sets_syncing_the_filesystem(root: &Path, sets: Vec<FileSet>) -> Result<()> {
    type Staged = Vec<(PathBuf, PathBuf)>;
    fn stage_all<'a>(
        root: &Path,
        files: impl Iterator<Item = &'a (String, Vec<u8>)>,
        staged: &mut Staged,
    ) -> Result<()> {
        for (rel, bytes) in files {
            let path = root.join(rel);
            let s = stage(&path, bytes, false)
                .with_context(|| format!("writing {}", path.display()))?;
            staged.push((s, path));
        }
        Ok(())
    }
    // (an entry leaves `staged` once renamed: what is left on an error is removed)
    fn rename_all(staged: &mut Staged) -> Result<()> {
        while let Some((s, path)) = staged.last() {
            std::fs::rename(s, path).with_context(|| format!("writing {}", path.display()))?;
            staged.pop();
        }
        Ok(())
    }
    // opened before the writes: syncfs reports the write-back errors since then
    let fs = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let syncfs = || {
        rustix::fs::syncfs(&fs)
            .map_err(std::io::Error::from)
            .with_context(|| format!("syncing the filesystem of {}", root.display()))
    };
    let mut staged = Staged::new();
    let mut run = || -> Result<()> {
        stage_all(root, sets.iter().flat_map(|(data, _)| data), &mut staged)?;
        syncfs()?;
        rename_all(&mut staged)?;
        stage_all(root, sets.iter().map(|(_, manifest)| manifest), &mut staged)?;
        syncfs()?;
        rename_all(&mut staged)?;
        syncfs()
    };
    let result = run();
    for (s, _) in &staged {
        let _ = std::fs::remove_file(s);
    }
    result
}

/// One file set's data files and then its manifest, on this (blocking) thread, each
/// durable before the next step (see `Store::put_sets`).
fn write_set(root: &Path, (data, manifest): FileSet) -> Result<()> {
    let write = |rel: &str, bytes: &[u8]| -> Result<PathBuf> {
        let path = root.join(rel);
        write_durable(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.parent().unwrap_or(root).to_path_buf())
    };
    let sync_dir = |dir: &Path| -> Result<()> {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (rel, bytes) in &data {
        let dir = write(rel, bytes)?;
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in &dirs {
        sync_dir(dir)?;
    }
    sync_dir(&write(&manifest.0, &manifest.1)?)
}

/// fsync each path (a file or a directory), side by side on blocking threads.
async fn sync_paths(paths: Vec<PathBuf>) -> Result<()> {
    futures::future::try_join_all(paths.into_iter().map(|path| async move {
        let p = path.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&p)?.sync_all())
            .await?
            .with_context(|| format!("syncing {}", path.display()))
    }))
    .await?;
    Ok(())
}

/// Run a store call from synchronous code (tools and tests), on a runtime of its own.
pub fn blocking<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn contract(s: &Store) {
        assert_eq!(s.get("period=p/entity=e/a.json").await.expect("get"), None);
        assert!(!s.exists("period=p/entity=e/a.json").await.expect("head"));
        s.put("period=p/entity=e/a.json", b"one".to_vec())
            .await
            .expect("put");
        s.put("period=p/entity=e/a.json", b"two".to_vec())
            .await
            .expect("put again");
        assert_eq!(
            s.get("period=p/entity=e/a.json").await.expect("get"),
            Some(b"two".to_vec())
        );
        assert!(s
            .create("period=p/index.json", b"first".to_vec())
            .await
            .expect("create"));
        assert!(!s
            .create("period=p/index.json", b"second".to_vec())
            .await
            .expect("create again"));
        assert_eq!(
            s.get("period=p/index.json").await.expect("get"),
            Some(b"first".to_vec())
        );
        s.put("period=q/entity=f/a.json", Vec::new())
            .await
            .expect("put");
        s.put_all(vec![
            ("period=p/entity=g/x.csv".into(), b"x".to_vec()),
            ("period=p/entity=g/y.csv".into(), b"y".to_vec()),
        ])
        .await
        .expect("put_all");
        s.mark_all(&[
            "period=p/entity=g/marker".into(),
            "period=p/entity=new/marker".into(),
        ])
        .await
        .expect("mark_all");
        // (in a directory it created; the other one is read below with its neighbours)
        assert_eq!(
            s.get("period=p/entity=new/marker").await.expect("get"),
            Some(Vec::new())
        );
        // file sets: each its data files, then its manifest
        let set = |e: &str| -> FileSet {
            (
                vec![
                    (format!("period=r/entity={e}/v1.csv"), e.as_bytes().to_vec()),
                    (format!("period=r/entity={e}/v1.parquet"), b"pq".to_vec()),
                ],
                (
                    format!("period=r/entity={e}/v1.manifest.json"),
                    b"m".to_vec(),
                ),
            )
        };
        s.put_sets(vec![set("a"), set("b")])
            .await
            .expect("put_sets");
        for (f, want) in [
            ("a/v1.csv", &b"a"[..]),
            ("b/v1.csv", b"b"),
            ("b/v1.parquet", b"pq"),
            ("a/v1.manifest.json", b"m"),
        ] {
            let got = s.get(&format!("period=r/entity={f}")).await.expect("get");
            assert_eq!(got.as_deref(), Some(want), "{f}");
        }
        for (f, want) in [("x.csv", &b"x"[..]), ("y.csv", b"y"), ("marker", b"")] {
            let got = s.get(&format!("period=p/entity=g/{f}")).await.expect("get");
            assert_eq!(got.as_deref(), Some(want), "{f}");
        }
        assert_eq!(
            s.dirs("").await.expect("dirs"),
            ["period=p", "period=q", "period=r"]
        );
        assert_eq!(
            s.dirs("period=p").await.expect("dirs"),
            ["entity=e", "entity=g", "entity=new"]
        );
        assert!(s.dirs("period=none").await.expect("dirs").is_empty());
    }

    #[tokio::test]
    async fn a_local_directory_and_memory_keep_the_same_contract() {
        let d = tempfile::tempdir().expect("tmp");
        let local = Store::local(&d.path().join("out")).expect("local");
        contract(&local).await;
        // plain files, no staging leftovers
        let dir = d.path().join("out/period=p/entity=e");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["a.json"]);
        contract(&Store::open("memory://", &BTreeMap::new()).expect("memory")).await;
    }

    fn syncing_the_filesystem() -> BTreeMap<String, String> {
        [("sync".to_string(), "filesystem".to_string())].into()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_directory_synced_a_filesystem_at_a_time_keeps_the_same_contract() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Store::local_with(&d.path().join("out"), &syncing_the_filesystem()).expect("local");
        assert_eq!(s.sync, LocalSync::Filesystem);
        contract(&s).await;
        // many sets in one batch, in directories none of them finds
        let sets: Vec<FileSet> = (0..50)
            .map(|i| {
                let dir = format!("period=d{}/entity=e{i}", i % 7);
                (
                    vec![
                        (format!("{dir}/lines.csv"), format!("csv {i}").into_bytes()),
                        (format!("{dir}/lines.parquet"), vec![i as u8; 100]),
                    ],
                    (
                        format!("{dir}/manifest.json"),
                        format!("m {i}").into_bytes(),
                    ),
                )
            })
            .collect();
        s.put_sets(sets).await.expect("put_sets");
        for i in 0..50 {
            let dir = d.path().join(format!("out/period=d{}/entity=e{i}", i % 7));
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
                .collect();
            names.sort();
            assert_eq!(
                names,
                ["lines.csv", "lines.parquet", "manifest.json"],
                "{i}"
            );
            let m = std::fs::read(dir.join("manifest.json")).expect("manifest");
            assert_eq!(m, format!("m {i}").into_bytes());
        }
        // a data file that cannot be written: no manifest of the batch, no staging left
        let bad = d.path().join("out/period=x/entity=b");
        std::fs::create_dir_all(bad.join("lines.csv")).expect("a directory in the way");
        let sets: Vec<FileSet> = ["a", "b"]
            .iter()
            .map(|e| {
                (
                    vec![
                        (format!("period=x/entity={e}/lines.parquet"), b"pq".to_vec()),
                        (format!("period=x/entity={e}/lines.csv"), b"l".to_vec()),
                    ],
                    (format!("period=x/entity={e}/manifest.json"), b"m".to_vec()),
                )
            })
            .collect();
        let e = s
            .put_sets(sets)
            .await
            .expect_err("a directory is in the way");
        assert!(format!("{e:#}").contains("entity=b/lines.csv"), "{e:#}");
        for e in ["a", "b"] {
            let dir = d.path().join(format!("out/period=x/entity={e}"));
            let names: Vec<String> = std::fs::read_dir(&dir)
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
                .filter(|n| n != "lines.csv")
                .collect();
            assert!(names.is_empty(), "{e}: {names:?}");
        }
    }

    #[tokio::test]
    async fn local_writes_go_through_a_synced_staging_file_and_leave_none_behind() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Store::local(&d.path().join("out")).expect("local");
        // many writers into one directory none of them finds: each creates it or takes
        // the one another created
        let files: Vec<(String, Vec<u8>)> = (0..32)
            .map(|i| (format!("period=p/entity=new/f{i}.csv"), vec![i as u8; 10]))
            .collect();
        s.put_all(files).await.expect("put_all");
        let dir = d.path().join("out/period=p/entity=new");
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 32);
        // a staging name already taken (a writer's crash) is stepped over, and left
        std::fs::write(dir.join("f0.csv#1"), b"old staging").expect("leftover");
        s.put("period=p/entity=new/f0.csv", b"new".to_vec())
            .await
            .expect("put");
        assert_eq!(std::fs::read(dir.join("f0.csv")).expect("read"), b"new");
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 33);
        // a rename that fails leaves what was there and no staging file
        std::fs::create_dir_all(dir.join("taken/inner")).expect("dir in the way");
        let e = s
            .put("period=p/entity=new/taken", b"x".to_vec())
            .await
            .expect_err("a directory is in the way");
        assert!(format!("{e:#}").contains("entity=new/taken"), "{e:#}");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("taken"))
            .collect();
        assert_eq!(names, ["taken"]);
        // a set whose data file cannot be written gets no manifest
        std::fs::create_dir_all(dir.join("v1.csv")).expect("dir in the way");
        let sets: Vec<FileSet> = ["new", "other"]
            .iter()
            .map(|e| {
                (
                    vec![(format!("period=p/entity={e}/v1.csv"), b"l".to_vec())],
                    (
                        format!("period=p/entity={e}/v1.manifest.json"),
                        b"m".to_vec(),
                    ),
                )
            })
            .collect();
        let e = s
            .put_sets(sets)
            .await
            .expect_err("a directory is in the way");
        assert!(format!("{e:#}").contains("entity=new/v1.csv"), "{e:#}");
        assert!(!dir.join("v1.manifest.json").exists());
    }

    #[test]
    fn locations_are_parsed_or_refused_with_the_reason() {
        let d = tempfile::tempdir().expect("tmp");
        let url = format!("file://{}", d.path().join("x").display());
        let s = Store::open(&url, &BTreeMap::new()).expect("file url");
        assert_eq!(
            s.local_root(),
            Some(d.path().join("x").canonicalize().expect("c").as_path())
        );
        let e = Store::open("ftp://h/x", &BTreeMap::new()).expect_err("ftp");
        assert!(e.to_string().contains("unknown scheme"), "{e}");
        // a local directory takes one option, `sync`
        let dir = d.path().join("y").display().to_string();
        let s = Store::open(&dir, &BTreeMap::new()).expect("default");
        assert_eq!(s.sync, LocalSync::Each);
        let each = [("sync".to_string(), "each".to_string())].into();
        assert_eq!(
            Store::open(&dir, &each).expect("each").sync,
            LocalSync::Each
        );
        match Store::open(&dir, &syncing_the_filesystem()) {
            Ok(s) => assert_eq!(s.sync, LocalSync::Filesystem),
            Err(e) => assert!(
                !cfg!(target_os = "linux") && format!("{e:#}").contains("needs Linux"),
                "{e:#}"
            ),
        }
        let bad = [("sync".to_string(), "never".to_string())].into();
        let e = Store::open(&dir, &bad).expect_err("bad sync");
        assert!(format!("{e:#}").contains("\"never\""), "{e:#}");
        let other = [("aws_region".to_string(), "x".to_string())].into();
        let e = Store::open(&url, &other).expect_err("an S3 option on a directory");
        assert!(format!("{e:#}").contains("aws_region"), "{e:#}");
        #[cfg(feature = "s3")]
        {
            let bad = [("no_such_option".to_string(), "1".to_string())].into();
            let e = Store::open("s3://bucket/p", &bad).expect_err("bad option");
            assert!(format!("{e:#}").contains("no_such_option"), "{e:#}");
            let e = Store::open("s3:///p", &BTreeMap::new()).expect_err("no bucket");
            assert!(e.to_string().contains("no bucket"), "{e}");
        }
    }
}
