//! How the tensor-core SLA forward kernel (`kernels.cu`, `sla_fwd_grouped`)
//! shares out windows among warps: each window gets warps in proportion to
//! its voxels, and windows are packed into blocks of [`WARPS`] warps. Pure
//! host code, built once per layout (untimed), so it is compiled and tested
//! in every build; `cuda.rs` uploads what it returns.
//!
//! Why. The other work list (`cuda.rs`, `WorkList`) gives every window over
//! a threshold a whole block of eight warps and packs the rest eight to a
//! block, one warp each. A window of 40 voxels then has eight warps for
//! five chunks of 8 voxels (phase 1) and three of 16 (phase 2), so most of
//! its block waits, and the grid needs several waves of blocks on a
//! Waymo-scale frame. Here a window of `n` voxels gets
//! `clamp(ceil(n / per_warp), 1, WARPS)` warps, contiguous within one
//! block, and blocks are filled best-fit in decreasing order of that count
//! (the largest windows first, so the longest-running blocks start first).
//!
//! The cluster list ([`cluster_items`], kernel `sla_fwd_cluster_*`) lifts
//! the cap of eight warps for the largest windows. On small scenes the one
//! block given the largest window sets the kernel's time: 585 voxels on a
//! nuScenes-like frame are 15 dependent chunks a warp in f32 (Nsight
//! Compute, the r7 run's README). There, a window may get up to
//! [`WARPS`] x [`CLUSTER`] warps in up to [`CLUSTER`] blocks of one
//! thread-block cluster. The autotuner tries it beside the grouped
//! shares; on an H200 it made the nuScenes-like frames' forward 1.33x
//! faster in f32 and 1.09x in bf16 (the r8 run's README).

/// Warps per block of the SLA kernels (`WARPS` in kernels.cu).
pub const WARPS: usize = 8;

/// One warp's work item, as the kernel decodes it:
/// `(window << 8) | (multi << 7) | (first << 4) | step`, where `step` is
/// the number of warps sharing the window (1..=8; 0 marks an empty slot),
/// `first` this warp's index among them, and `multi` is set on every slot
/// of a block that holds a window shared by more than one warp (the block
/// then meets at a barrier to sum the shared windows' states).
pub fn encode(window: u32, multi: bool, first: u32, step: u32) -> i32 {
    debug_assert!(window < 1 << 23 && first < 8 && step <= 8);
    ((window << 8) | (u32::from(multi) << 7) | (first << 4) | step) as i32
}

/// The warps given to a window of `n` voxels.
pub fn warps_for(n: u32, per_warp: u32) -> u32 {
    n.div_ceil(per_warp.max(1)).clamp(1, WARPS as u32)
}

/// Work items, [`WARPS`] per block, block-major; empty windows get none.
/// Fails if there are more windows than the item format can name.
pub fn grouped_items(counts: &[u32], per_warp: u32) -> Result<Vec<i32>, String> {
    nameable(counts.len(), 23, "grouped", "BENCH_SUITE_SLA_GROUP=0")?;
    let mut items = Vec::new();
    let blocks = pack_blocks(counts, per_warp, |_| true);
    emit_blocks(&blocks, &mut items, encode);
    Ok(items)
}

/// Blocks per thread-block cluster of the cluster forward kernel
/// (`CLUSTER` in kernels.cu, `sla_fwd_cluster_*`).
pub const CLUSTER: usize = 4;

/// The warps given to a window of `n` voxels by the cluster schedule: one
/// per `per_warp` voxels, up to [`WARPS`] x [`CLUSTER`]. A window given
/// more than [`WARPS`] spans blocks ([`cluster_items`]).
pub fn cluster_warps_for(n: u32, per_warp: u32) -> u32 {
    n.div_ceil(per_warp.max(1))
        .clamp(1, (WARPS * CLUSTER) as u32)
}

/// One warp's work item in the cluster schedule, as the kernel decodes
/// it: `(window << 13) | (csync << 12) | (multi << 11) | (first << 6) |
/// step`. `step` (0..=32) is the number of warps sharing the window (0
/// marks an empty slot), `first` (0..32) this warp's index among them,
/// `multi` as in [`encode`], and `csync` is set on every slot of every
/// block of a cluster that holds a window spanning blocks: those blocks
/// meet at the cluster's barriers.
pub fn encode_wide(window: u32, csync: bool, multi: bool, first: u32, step: u32) -> i32 {
    debug_assert!(window < 1 << 19 && first < 32 && step <= 32);
    ((window << 13) | (u32::from(csync) << 12) | (u32::from(multi) << 11) | (first << 6) | step)
        as i32
}

/// Work items of the cluster schedule, [`WARPS`] per block, block-major,
/// the block count a multiple of [`CLUSTER`]; empty windows get none.
///
/// A window given more than [`WARPS`] warps ([`cluster_warps_for`]) gets
/// `nb = ceil(warps / WARPS)` whole blocks (2 to [`CLUSTER`]), adjacent
/// within one cluster: block `r` of its span holds its warps `8r .. 8r +
/// 7` (`first`), and `step = 8 nb`. The kernel sums the span's states
/// through distributed shared memory. Those windows fill clusters first
/// (first fit, the widest first), then the other windows are packed as
/// [`grouped_items`] packs them, in clusters of their own that never
/// synchronise. Blocks left over in either kind of cluster are empty.
/// Fails if there are more windows than the item format can name.
pub fn cluster_items(counts: &[u32], per_warp: u32) -> Result<Vec<i32>, String> {
    nameable(counts.len(), 19, "cluster", "another schedule")?;
    let span = |w: u32| {
        let n = counts[w as usize];
        (n > 0)
            .then(|| (cluster_warps_for(n, per_warp) as usize).div_ceil(WARPS))
            .filter(|&nb| nb > 1)
    };
    let mut wide: Vec<(u32, usize)> = (0..counts.len() as u32)
        .filter_map(|w| span(w).map(|nb| (w, nb)))
        .collect();
    wide.sort_by_key(|&(w, nb)| {
        (
            std::cmp::Reverse(nb),
            std::cmp::Reverse(counts[w as usize]),
            w,
        )
    });
    // clusters[c]: the spanning windows of cluster c and their blocks.
    let mut clusters: Vec<Vec<(u32, usize)>> = Vec::new();
    for (w, nb) in wide {
        let used = |c: &Vec<(u32, usize)>| c.iter().map(|x| x.1).sum::<usize>();
        match clusters.iter_mut().find(|c| used(c) + nb <= CLUSTER) {
            Some(c) => c.push((w, nb)),
            None => clusters.push(vec![(w, nb)]),
        }
    }
    let empty_block = |csync: bool| (0..WARPS).map(move |_| encode_wide(0, csync, false, 0, 0));
    let mut items = Vec::new();
    for c in &clusters {
        let mut blocks = 0;
        for &(w, nb) in c {
            let step = (WARPS * nb) as u32;
            items.extend((0..step).map(|f| encode_wide(w, true, true, f, step)));
            blocks += nb;
        }
        for _ in blocks..CLUSTER {
            items.extend(empty_block(true));
        }
    }
    let blocks = pack_blocks(counts, per_warp, |w| span(w).is_none());
    emit_blocks(&blocks, &mut items, |w, multi, f, g| {
        encode_wide(w, false, multi, f, g)
    });
    // Always one cluster at least: the grid cannot be empty.
    let wanted = blocks
        .len()
        .next_multiple_of(CLUSTER)
        .max(if items.is_empty() { CLUSTER } else { 0 });
    for _ in blocks.len()..wanted {
        items.extend(empty_block(false));
    }
    Ok(items)
}

/// Fails, naming `fix`, if `windows` windows need more than `bits` bits.
fn nameable(windows: usize, bits: u32, list: &str, fix: &str) -> Result<(), String> {
    let most = (1usize << bits) - 1;
    if windows > most {
        return Err(format!(
            "{windows} windows: the {list} work list names at most {most} (use {fix})"
        ));
    }
    Ok(())
}

/// Slots of one block: (window, first, step) per filled slot.
type Block = Vec<(u32, u32, u32)>;

/// Appends the items of `blocks`, [`WARPS`] per block (empty slots last),
/// made by `encode(window, multi, first, step)`; `multi` is set on every
/// slot of a block where some window has several warps.
fn emit_blocks(
    blocks: &[Block],
    items: &mut Vec<i32>,
    encode: impl Fn(u32, bool, u32, u32) -> i32,
) {
    for slots in blocks {
        let multi = slots.iter().any(|&(_, _, g)| g > 1);
        items.extend(slots.iter().map(|&(w, f, g)| encode(w, multi, f, g)));
        items.extend((slots.len()..WARPS).map(|_| encode(0, multi, 0, 0)));
    }
}

/// The non-empty windows that `keep` admits, given [`warps_for`] warps
/// each, packed best-fit into blocks of [`WARPS`] warps in decreasing
/// order of warps (then voxels): a window's warps are contiguous in one
/// block.
fn pack_blocks(counts: &[u32], per_warp: u32, keep: impl Fn(u32) -> bool) -> Vec<Block> {
    let mut order: Vec<u32> = (0..counts.len() as u32)
        .filter(|&w| counts[w as usize] > 0 && keep(w))
        .collect();
    order.sort_by_key(|&w| {
        let n = counts[w as usize];
        (
            std::cmp::Reverse(warps_for(n, per_warp)),
            std::cmp::Reverse(n),
            w,
        )
    });
    // open[r]: blocks with r free slots.
    let mut blocks: Vec<Block> = Vec::new();
    let mut open: Vec<Vec<usize>> = vec![Vec::new(); WARPS];
    for w in order {
        let g = warps_for(counts[w as usize], per_warp);
        let b = match (g as usize..WARPS).find(|&r| !open[r].is_empty()) {
            Some(r) => open[r].pop().expect("non-empty"),
            None => {
                blocks.push(Vec::with_capacity(WARPS));
                blocks.len() - 1
            }
        };
        blocks[b].extend((0..g).map(|f| (w, f, g)));
        let free = WARPS - blocks[b].len();
        if free > 0 {
            open[free].push(b);
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(it: i32) -> (u32, bool, u32, u32) {
        let u = it as u32;
        (u >> 8, (u >> 7) & 1 == 1, (u >> 4) & 7, u & 15)
    }

    #[test]
    fn every_window_gets_its_warps_once_and_contiguously() {
        // A long-tailed mix, with an empty window and a few giants.
        let counts: Vec<u32> = (0..500u32)
            .map(|i| match i % 50 {
                0 => 0,
                1 => 900,
                2..=5 => 33 + 17 * (i % 7),
                _ => 1 + (i * 7919) % 40,
            })
            .collect();
        let per_warp = 32;
        let items = grouped_items(&counts, per_warp).unwrap();
        assert_eq!(items.len() % WARPS, 0);
        let mut seen = vec![0u32; counts.len()];
        for block in items.chunks(WARPS) {
            let d: Vec<_> = block.iter().map(|&x| decode(x)).collect();
            let multi = d.iter().any(|&(_, _, _, g)| g > 1);
            let mut s = 0;
            while s < WARPS {
                let (w, m, f, g) = d[s];
                assert_eq!(
                    m, multi,
                    "the multi flag is the same on every slot of a block"
                );
                if g == 0 {
                    assert!(d[s..].iter().all(|x| x.3 == 0), "empty slots come last");
                    break;
                }
                assert_eq!(f, 0, "a window's warps start at its first");
                for (k, &(w2, _, f2, g2)) in d[s..s + g as usize].iter().enumerate() {
                    assert_eq!((w2, f2, g2), (w, k as u32, g));
                }
                seen[w as usize] += g;
                s += g as usize;
            }
        }
        for (w, &n) in counts.iter().enumerate() {
            let want = if n == 0 { 0 } else { warps_for(n, per_warp) };
            assert_eq!(seen[w], want, "window {w} of {n} voxels");
        }
        // Best fit wastes little here: the one-warp windows fill the gaps.
        let used: u32 = seen.iter().sum();
        let blocks = (items.len() / WARPS) as u32;
        assert!(
            blocks <= used.div_ceil(WARPS as u32) + WARPS as u32,
            "{blocks} blocks for {used} warps"
        );
    }

    #[test]
    fn warps_follow_the_voxel_count() {
        assert_eq!(warps_for(1, 32), 1);
        assert_eq!(warps_for(32, 32), 1);
        assert_eq!(warps_for(33, 32), 2);
        assert_eq!(warps_for(100, 32), 4);
        assert_eq!(warps_for(10_000, 32), 8);
        assert_eq!(
            warps_for(5, 0),
            5,
            "a zero share is taken as one voxel a warp"
        );
        // The largest windows come first.
        let items = grouped_items(&[3, 300, 40], 32).unwrap();
        assert_eq!(decode(items[0]), (1, true, 0, 8));
        assert_eq!(decode(items[8]), (2, true, 0, 2));
        assert_eq!(decode(items[10]), (0, true, 0, 1));
        assert_eq!(decode(items[11]).3, 0);
    }

    fn decode_wide(it: i32) -> (u32, bool, bool, u32, u32) {
        let u = it as u32;
        (
            u >> 13,
            (u >> 12) & 1 == 1,
            (u >> 11) & 1 == 1,
            (u >> 6) & 31,
            u & 63,
        )
    }

    #[test]
    fn cluster_list_spans_big_windows_within_one_cluster() {
        let counts: Vec<u32> = (0..300u32)
            .map(|i| match i % 30 {
                0 => 0,
                1 => 900,
                2 => 100 + 13 * (i % 11),
                _ => 1 + (i * 7919) % 40,
            })
            .collect();
        for per_warp in [4, 16, 32, 1000] {
            let items = cluster_items(&counts, per_warp).unwrap();
            assert_eq!(items.len() % (WARPS * CLUSTER), 0);
            let mut seen = vec![0u32; counts.len()];
            for cluster in items.chunks(WARPS * CLUSTER) {
                let d: Vec<_> = cluster.iter().map(|&x| decode_wide(x)).collect();
                let csync = d[0].1;
                assert!(
                    d.iter().all(|x| x.1 == csync),
                    "csync is uniform in a cluster"
                );
                assert_eq!(
                    csync,
                    d.iter().any(|x| x.4 as usize > WARPS),
                    "csync marks exactly the clusters with a spanning window"
                );
                let mut s = 0;
                while s < d.len() {
                    let (w, _, _, f, g) = d[s];
                    if g == 0 {
                        s += 1;
                        continue;
                    }
                    assert_eq!(f, 0, "a window's warps start at its first");
                    let g = g as usize;
                    assert!(s + g <= d.len(), "window {w} leaves its cluster");
                    if g > WARPS {
                        assert_eq!(s % WARPS, 0, "a spanning window starts a block");
                        assert_eq!(g % WARPS, 0, "and fills its blocks");
                    } else {
                        assert_eq!(
                            s / WARPS,
                            (s + g - 1) / WARPS,
                            "window {w} stays in a block"
                        );
                    }
                    for (k, x) in d[s..s + g].iter().enumerate() {
                        assert_eq!((x.0, x.3, x.4 as usize), (w, k as u32, g));
                    }
                    seen[w as usize] += g as u32;
                    s += g;
                }
                for block in d.chunks(WARPS) {
                    assert!(
                        block.iter().all(|x| x.2 == block[0].2),
                        "multi is uniform in a block"
                    );
                    let shared = block.iter().any(|x| x.4 > 1);
                    assert_eq!(
                        block[0].2, shared,
                        "multi marks blocks with a shared window"
                    );
                }
            }
            for (w, &n) in counts.iter().enumerate() {
                let g = cluster_warps_for(n, per_warp);
                let want = match n {
                    0 => 0,
                    _ if g as usize > WARPS => (g as usize).next_multiple_of(WARPS) as u32,
                    _ => g,
                };
                assert_eq!(seen[w], want, "window {w} of {n} voxels, {per_warp} a warp");
            }
        }
        // 900 voxels at 32 a warp: 29 warps, so four blocks of eight.
        let items = cluster_items(&[900, 5], 32).unwrap();
        assert_eq!(items.len(), 2 * WARPS * CLUSTER);
        assert_eq!(decode_wide(items[0]), (0, true, true, 0, 32));
        assert_eq!(decode_wide(items[31]), (0, true, true, 31, 32));
        assert_eq!(decode_wide(items[32]), (1, false, false, 0, 1));
        assert_eq!(decode_wide(items[33]), (0, false, false, 0, 0));
        assert!(cluster_items(&vec![1; 1 << 19], 32).is_err());
        let none = cluster_items(&[0, 0], 32).unwrap();
        assert_eq!(none.len(), WARPS * CLUSTER, "one empty cluster at least");
        assert!(none
            .iter()
            .all(|&x| decode_wide(x) == (0, false, false, 0, 0)));
    }
}
