//! What a run will execute: (workload, variant, entry) units chosen from a
//! registry by the command line, and the deterministic share of them that
//! one shard of N runs.

use std::fmt;
use std::str::FromStr;

use workloads::{Device, Entry, Profile, Variant, Workload};

/// One unit of work: every configuration and trial of an entry on a variant.
#[derive(Clone, Copy)]
pub struct Unit {
    pub workload: &'static dyn Workload,
    pub variant: &'static Variant,
    pub entry: &'static Entry,
}

impl Unit {
    pub fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.workload.spec().id,
            self.variant.id,
            self.entry.id
        )
    }
}

impl fmt::Debug for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// `--shard I/N`: the I-th (1-based) of N shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("malformed shard `{s}`: write I/N with 1 <= I <= N, e.g. --shard 2/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Empty: the whole registry (`suite`).
    pub workloads: Vec<String>,
    /// Empty: every variant that runs by default in the profile.
    pub variants: Vec<String>,
    /// Empty: every entry that applies to the variant.
    pub entries: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown workload `{name}`; valid workloads: {valid}")]
    UnknownWorkload { name: String, valid: String },
    #[error("unknown variant `{name}`{scope}; valid variants: {valid}")]
    UnknownVariant {
        name: String,
        scope: String,
        valid: String,
    },
    #[error("unknown entry `{name}`{scope}; valid entries: {valid}")]
    UnknownEntry {
        name: String,
        scope: String,
        valid: String,
    },
    #[error("nothing to run: {0}")]
    Empty(String),
    #[error("entry `{0}` runs only on a GPU; add `--device cuda`")]
    NeedsCuda(String),
}

/// Resolves a selection against a registry, in registry order.
pub fn plan(
    registry: &[&'static dyn Workload],
    selection: &Selection,
    profile: Profile,
    device: Device,
) -> Result<Vec<Unit>, PlanError> {
    walk(registry, selection, profile, device).map(|(units, _)| units)
}

/// What [`plan`] leaves out on `device` because an entry has no form for
/// it in a variant (`Entry::cpu_only_variants` on a GPU), as
/// `workload/variant/entry`; the run says so.
pub fn left_out(
    registry: &[&'static dyn Workload],
    selection: &Selection,
    profile: Profile,
    device: Device,
) -> Vec<String> {
    walk(registry, selection, profile, device).map_or_else(|_| Vec::new(), |(_, out)| out)
}

fn walk(
    registry: &[&'static dyn Workload],
    selection: &Selection,
    profile: Profile,
    device: Device,
) -> Result<(Vec<Unit>, Vec<String>), PlanError> {
    let mut chosen = Vec::new();
    for name in &selection.workloads {
        let w = registry
            .iter()
            .copied()
            .find(|w| w.spec().id == name)
            .ok_or_else(|| PlanError::UnknownWorkload {
                name: name.clone(),
                valid: registry
                    .iter()
                    .map(|w| w.spec().id)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        chosen.push(w);
    }
    if selection.workloads.is_empty() {
        chosen = registry.to_vec();
    }
    let scope = |ws: &[&dyn Workload]| match ws {
        [one] => format!(" in workload `{}`", one.spec().id),
        _ => " in any selected workload".to_string(),
    };
    for name in &selection.variants {
        if !chosen.iter().any(|w| w.spec().variant(name).is_some()) {
            return Err(PlanError::UnknownVariant {
                name: name.clone(),
                scope: scope(&chosen),
                valid: chosen
                    .iter()
                    .flat_map(|w| w.spec().variants.iter().map(|v| v.id))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    for name in &selection.entries {
        if !chosen.iter().any(|w| w.spec().entry(name).is_some()) {
            return Err(PlanError::UnknownEntry {
                name: name.clone(),
                scope: scope(&chosen),
                valid: chosen
                    .iter()
                    .flat_map(|w| w.spec().entries.iter().map(|e| e.id))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let mut units = Vec::new();
    let mut left_out = Vec::new();
    for w in chosen {
        let spec = w.spec();
        for variant in spec.variants {
            let wanted = if selection.variants.is_empty() {
                variant.runs_by_default(profile)
            } else {
                selection.variants.iter().any(|v| v == variant.id)
            };
            if !wanted {
                continue;
            }
            for entry in spec.entries {
                let named = selection.entries.iter().any(|e| e == entry.id);
                if entry.cuda_only && !device.is_cuda() {
                    if named {
                        return Err(PlanError::NeedsCuda(entry.id.into()));
                    }
                    continue;
                }
                let wanted = selection.entries.is_empty() || named;
                if wanted
                    && entry.applies_to(variant.id)
                    && device.is_cuda()
                    && entry.cpu_only_variants.contains(&variant.id)
                {
                    left_out.push(format!("{}/{}/{}", spec.id, variant.id, entry.id));
                    continue;
                }
                if wanted && entry.applies_to(variant.id) {
                    units.push(Unit {
                        workload: w,
                        variant,
                        entry,
                    });
                }
            }
        }
    }
    if units.is_empty() {
        let why = if left_out.is_empty() {
            "no entry of the selection applies to the selected variants (see `bench-suite list`)"
                .to_string()
        } else {
            let (verb, them) = if left_out.len() == 1 {
                ("has", "it")
            } else {
                ("have", "them")
            };
            format!(
                "{} {verb} no GPU form yet; run {them} with --device cpu",
                left_out.join(", ")
            )
        };
        return Err(PlanError::Empty(why));
    }
    Ok((units, left_out))
}

/// The units of one shard: round-robin over the full plan, so each shard
/// gets a spread of workloads and the union of all shards is the plan.
pub fn shard(units: Vec<Unit>, shard: Option<Shard>) -> Vec<Unit> {
    match shard {
        None => units,
        Some(s) => units
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % s.count == s.index - 1)
            .map(|(_, u)| u)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_only_entries_stay_out_of_cpu_runs_and_naming_one_is_an_error() {
        let registry = workloads::WORKLOADS;
        let pick = |entries: &[&str], device| {
            plan(
                registry,
                &Selection {
                    workloads: vec!["point-cloud-sla".into()],
                    variants: vec![],
                    entries: entries.iter().map(|e| e.to_string()).collect(),
                },
                Profile::Quick,
                device,
            )
        };
        let cpu = pick(&[], Device::Cpu).unwrap();
        assert!(!cpu.is_empty());
        assert!(cpu.iter().all(|u| !u.entry.cuda_only));
        let gpu = pick(&[], Device::Cuda(0)).unwrap();
        assert!(gpu.iter().any(|u| u.entry.id == "pytorch-scatter"));
        let err = pick(&["pytorch-scatter"], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("--device cuda"), "{err}");
    }

    #[test]
    fn entries_without_a_gpu_form_stay_out_of_gpu_runs_of_those_variants() {
        let registry = workloads::WORKLOADS;
        let sel = |variants: &[&str], entries: &[&str]| Selection {
            workloads: vec!["long-context".into()],
            variants: variants.iter().map(|v| v.to_string()).collect(),
            entries: entries.iter().map(|e| e.to_string()).collect(),
        };
        let ids = |units: Vec<Unit>| units.iter().map(Unit::label).collect::<Vec<_>>();
        let both = sel(&["needle", "decode-step"], &["kv-cluster"]);
        let gpu = ids(plan(registry, &both, Profile::Quick, Device::Cuda(0)).unwrap());
        assert_eq!(gpu, ["long-context/decode-step/kv-cluster"]);
        assert_eq!(
            left_out(registry, &both, Profile::Quick, Device::Cuda(0)),
            ["long-context/needle/kv-cluster"]
        );
        let cpu = ids(plan(registry, &both, Profile::Quick, Device::Cpu).unwrap());
        assert!(cpu.contains(&"long-context/needle/kv-cluster".to_string()));
        assert!(left_out(registry, &both, Profile::Quick, Device::Cpu).is_empty());
        // Nothing left to run on the GPU: an error that says why.
        let err = plan(
            registry,
            &sel(&["needle"], &["dhsa"]),
            Profile::Quick,
            Device::Cuda(0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("long-context/needle/dhsa has no GPU form yet")
                && err.contains("--device cpu"),
            "{err}"
        );
    }

    #[test]
    fn shards_parse_strictly() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["0/4", "5/4", "1/0", "1", "a/b", "1/2/3", ""] {
            assert!(
                bad.parse::<Shard>()
                    .unwrap_err()
                    .contains("malformed shard"),
                "{bad}"
            );
        }
    }
}
