//! The adapter cache: adapters loaded on first use (off the generation thread), held in a
//! byte-budgeted device tier and a host-RAM tier below it. When the device tier is over budget
//! the least recently used adapter no request holds moves down to host RAM; when the host tier
//! is over budget the least recently used one is dropped (and re-read from disk next time).
//! On the CPU the two tiers share the same memory, so moving down is bookkeeping only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lorq_lora::merge::{merge_adapters, MajoritySignMethod, MergeSpec, MergeStrategy};
use lorq_lora::LoraAdapter;
use lorq_model::LoadedModel;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::adapter_path;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::wire::native::MergedAdapters;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Device,
    Host,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
        }
    }
}

struct Entry {
    adapter: Arc<LoraAdapter>,
    tier: Tier,
    bytes: usize,
    last_used: u64,
    /// Where it came from: a folder, or `merged` for a `merged_adapters` combination.
    source: String,
}

type LoadCell = Arc<OnceCell<Result<Arc<LoraAdapter>, ApiError>>>;

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Loads in progress: concurrent requests for one adapter wait on the same load.
    loading: HashMap<String, LoadCell>,
    /// Names registered by `POST /v1/load_lora_adapter` with an explicit path.
    aliases: HashMap<String, PathBuf>,
    clock: u64,
}

/// One row of `GET /v1/lora_adapters`.
#[derive(Debug, Serialize)]
pub struct AdapterInfo {
    pub id: String,
    pub source: String,
    pub tier: Tier,
    pub bytes: usize,
    pub in_use: usize,
    pub rank: Option<usize>,
}

pub struct AdapterStore {
    roots: Vec<PathBuf>,
    model: Arc<LoadedModel>,
    device_budget: usize,
    host_budget: usize,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

impl AdapterStore {
    pub fn new(
        roots: Vec<PathBuf>,
        model: Arc<LoadedModel>,
        device_budget: usize,
        host_budget: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            roots,
            model,
            device_budget,
            host_budget,
            metrics,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapter named `id`, loading it on first use.
    pub async fn get(&self, id: &str) -> Result<Arc<LoraAdapter>, ApiError> {
        if let Some(a) = self.hit(id) {
            return Ok(a);
        }
        let alias = self.lock().aliases.get(id).cloned();
        let path = match alias {
            Some(p) => p,
            None => adapter_path::resolve(&self.roots, id)?,
        };
        let model = self.model.clone();
        let source = path.display().to_string();
        let label = id.to_string();
        self.load_once(id, source, move || {
            tokio::task::spawn_blocking(move || {
                model.load_adapter(&path).map_err(|e| {
                    ApiError::validation(format!("adapter {label:?} failed to load: {e}"))
                })
            })
        })
        .await
    }

    /// The combination `spec` describes (LoRAX `merged_adapters`), merged in ΔW space once and
    /// cached under its canonical description, which is returned with it (the request's key).
    pub async fn get_merged(
        &self,
        spec: &MergedAdapters,
    ) -> Result<(String, Arc<LoraAdapter>), ApiError> {
        let merge = merge_spec(spec)?;
        let key = format!(
            "merged:{}",
            serde_json::to_string(spec).expect("plain data serializes")
        );
        if let Some(a) = self.hit(&key) {
            return Ok((key, a));
        }
        let mut parts = Vec::with_capacity(spec.ids.len());
        for (id, &w) in spec.ids.iter().zip(&spec.weights) {
            parts.push((self.get(id).await?, w));
        }
        let model = self.model.clone();
        let merged = self
            .load_once(&key, "merged".into(), move || {
                tokio::task::spawn_blocking(move || {
                    let merged = merge_adapters(&parts, &merge)
                        .map_err(|e| ApiError::validation(format!("merged_adapters: {e}")))?;
                    model
                        .model
                        .check_adapter(&merged)
                        .map_err(|e| ApiError::validation(format!("merged_adapters: {e}")))?;
                    Ok(Arc::new(merged))
                })
            })
            .await?;
        Ok((key, merged))
    }

    fn hit(&self, key: &str) -> Option<Arc<LoraAdapter>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let e = inner.entries.get_mut(key)?;
        e.last_used = clock;
        let promoted = e.tier == Tier::Host;
        e.tier = Tier::Device;
        let a = e.adapter.clone();
        if promoted {
            tracing::debug!("adapter {key} moved up to the device tier");
            self.rebalance(&mut inner);
        }
        Some(a)
    }

    async fn load_once<F, Fut>(
        &self,
        key: &str,
        source: String,
        load: F,
    ) -> Result<Arc<LoraAdapter>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<
            Output = Result<Result<Arc<LoraAdapter>, ApiError>, tokio::task::JoinError>,
        >,
    {
        let cell = self
            .lock()
            .loading
            .entry(key.to_string())
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| async {
                let started = std::time::Instant::now();
                let r = match load().await {
                    Ok(r) => r,
                    Err(e) => Err(ApiError::generation(format!(
                        "loading adapter {key:?} stopped unexpectedly: {e}"
                    ))),
                };
                match &r {
                    Ok(a) => {
                        self.metrics.adapter_loads.with_label_values(&["ok"]).inc();
                        tracing::info!(
                            "adapter {key} loaded from {source} ({} bytes) in {:.0} ms",
                            a.bytes(),
                            started.elapsed().as_secs_f64() * 1e3
                        );
                    }
                    Err(e) => {
                        self.metrics
                            .adapter_loads
                            .with_label_values(&["error"])
                            .inc();
                        tracing::warn!("adapter {key}: {}", e.message);
                    }
                }
                r
            })
            .await
            .clone();
        let mut inner = self.lock();
        if inner
            .loading
            .get(key)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            inner.loading.remove(key);
            // A failed load is not cached: a fixed adapter folder loads on the next request.
            if let Ok(a) = &result {
                inner.clock += 1;
                let clock = inner.clock;
                inner.entries.insert(
                    key.to_string(),
                    Entry {
                        adapter: a.clone(),
                        tier: Tier::Device,
                        bytes: a.bytes(),
                        last_used: clock,
                        source,
                    },
                );
                self.rebalance(&mut inner);
            }
        }
        result
    }

    /// Moves least recently used, unheld adapters down a tier until both fit their budgets.
    fn rebalance(&self, inner: &mut Inner) {
        let held = |e: &Entry| Arc::strong_count(&e.adapter) > 1;
        loop {
            let device: usize = tier_bytes(inner, Tier::Device);
            if device <= self.device_budget {
                break;
            }
            let victim = inner
                .entries
                .iter()
                .filter(|(_, e)| e.tier == Tier::Device && !held(e))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            inner.entries.get_mut(&k).expect("listed").tier = Tier::Host;
            self.metrics
                .adapter_evictions
                .with_label_values(&["device"])
                .inc();
            tracing::debug!("adapter {k} moved down to the host tier");
        }
        loop {
            if tier_bytes(inner, Tier::Host) <= self.host_budget {
                break;
            }
            let victim = inner
                .entries
                .iter()
                .filter(|(_, e)| e.tier == Tier::Host && !held(e))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            inner.entries.remove(&k);
            self.metrics
                .adapter_evictions
                .with_label_values(&["host"])
                .inc();
            tracing::debug!("adapter {k} dropped from memory");
        }
        for tier in [Tier::Device, Tier::Host] {
            let n = inner.entries.values().filter(|e| e.tier == tier).count();
            self.metrics
                .adapters
                .with_label_values(&[tier.label()])
                .set(n as i64);
            self.metrics
                .adapter_bytes
                .with_label_values(&[tier.label()])
                .set(tier_bytes(inner, tier) as i64);
        }
    }

    /// `POST /v1/load_lora_adapter`: loads now; `path` (inside an adapter root) names the folder
    /// when it differs from the id.
    pub async fn load(&self, name: &str, path: Option<&str>) -> Result<Arc<LoraAdapter>, ApiError> {
        if let Some(p) = path {
            let resolved = self.resolve_path(p)?;
            self.lock().aliases.insert(name.to_string(), resolved);
        }
        self.get(name).await
    }

    fn resolve_path(&self, p: &str) -> Result<PathBuf, ApiError> {
        let path = PathBuf::from(p);
        if path.is_absolute() {
            let canonical = path.canonicalize().map_err(|e| {
                ApiError::not_found(format!("lora_path {p:?} cannot be opened: {e}"))
            })?;
            for root in &self.roots {
                if let Ok(r) = root.canonicalize() {
                    if canonical.starts_with(&r) {
                        return Ok(canonical);
                    }
                }
            }
            return Err(ApiError::validation(format!(
                "lora_path {p:?} is outside every --adapter-dir; refused"
            )));
        }
        adapter_path::resolve(&self.roots, p)
    }

    /// `POST /v1/unload_lora_adapter`: forgets the adapter (requests using it finish first,
    /// since they hold their own reference).
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        inner.aliases.remove(name);
        if inner.entries.remove(name).is_none() {
            return Err(ApiError::not_found(format!(
                "adapter {name:?} is not loaded"
            )));
        }
        self.rebalance(&mut inner);
        // Decode graphs keep the weights they read; let the unloaded adapter's go.
        self.model.model.clear_cuda_graphs();
        Ok(())
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let inner = self.lock();
        let mut v: Vec<AdapterInfo> = inner
            .entries
            .iter()
            .map(|(k, e)| AdapterInfo {
                id: k.clone(),
                source: e.source.clone(),
                tier: e.tier,
                bytes: e.bytes,
                in_use: Arc::strong_count(&e.adapter) - 1,
                rank: e.adapter.modules().map(|(_, m)| m.rank()).max(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

fn tier_bytes(inner: &Inner, tier: Tier) -> usize {
    inner
        .entries
        .values()
        .filter(|e| e.tier == tier)
        .map(|e| e.bytes)
        .sum()
}

fn merge_spec(spec: &MergedAdapters) -> Result<MergeSpec, ApiError> {
    if spec.ids.is_empty() {
        return Err(ApiError::validation("merged_adapters.ids is empty"));
    }
    if spec.ids.len() != spec.weights.len() {
        return Err(ApiError::validation(format!(
            "merged_adapters has {} ids but {} weights",
            spec.ids.len(),
            spec.weights.len()
        )));
    }
    let strategy: MergeStrategy = spec
        .merge_strategy
        .as_deref()
        .unwrap_or("linear")
        .parse()
        .map_err(|e| ApiError::validation(format!("merged_adapters.merge_strategy: {e}")))?;
    let majority_sign_method: MajoritySignMethod = spec
        .majority_sign_method
        .as_deref()
        .unwrap_or("total")
        .parse()
        .map_err(|e| ApiError::validation(format!("merged_adapters.majority_sign_method: {e}")))?;
    let density = spec.density.unwrap_or(1.0);
    Ok(MergeSpec {
        strategy,
        density,
        majority_sign_method,
        seed: 0,
    })
}
