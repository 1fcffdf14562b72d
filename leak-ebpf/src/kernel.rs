//! Reads of kernel memory through the layout table userspace resolved from BTF.

use aya_ebpf::helpers::generated::bpf_get_current_task;
use aya_ebpf::helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_kernel_str};
use leak_common::layout::{memory_event, stat, stats_scheme, Layout};

/// Filled in by userspace before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub(crate) static LAYOUT: Layout = Layout {
    task_pid: 0,
    task_tgid: 0,
    task_comm: 0,
    task_mm: 0,
    task_signal: 0,
    task_cgroups: 0,
    task_thread_pid: 0,
    pid_level: 0,
    pid_numbers: 0,
    upid_size: 0,
    upid_nr: 0,
    signal_oom_score_adj: 0,
    mm_rss_stat: 0,
    rss_scheme: 0,
    rss_stride: 0,
    rss_value: 0,
    rss_file_index: 0,
    rss_anon_index: 0,
    rss_shmem_index: 0,
    css_set_subsys: 0,
    memory_subsys_id: 0,
    css_cgroup: 0,
    css_parent: 0,
    cgroup_kn: 0,
    kn_id: 0,
    kn_name: 0,
    memcg_css: 0,
    memcg_memory: 0,
    stats_scheme: 0,
    memcg_vmstats: 0,
    vmstats_state: 0,
    lru_stat_index: [0; 5],
    stat_index: [0; stat::COUNT],
    memcg_memory_events: 0,
    memory_event_index: [0; memory_event::COUNT],
    failcnt_v1_only: 0,
    counter_usage: 0,
    counter_max: 0,
    counter_watermark: 0,
    counter_failcnt: 0,
    oc_memcg: 0,
    oc_chosen: 0,
    oc_chosen_points: 0,
    oc_totalpages: 0,
    oc_constraint: 0,
    oc_gfp_mask: 0,
    oc_order: 0,
    mark_victim_has_task: 0,
    tp_mark_victim_pid: 0,
    _pad: 0,
    task_group_leader: 0,
    task_thread_node: 0,
    signal_thread_head: 0,
    tp_signal_generate_sig: 0,
    tp_signal_generate_code: 0,
    tp_signal_generate_pid: 0,
    memcg_memsw: 0,
    memsw_accounted: 0,
    task_start_time: 0,
};

/// Reads one layout value. Volatile, so the compiler cannot fold the zero initialiser.
macro_rules! layout {
    ($($field:tt)+) => {
        // SAFETY: LAYOUT is a plain static; the read is in bounds and aligned.
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::LAYOUT.$($field)+) }
    };
}
pub(crate) use layout;

/// Types [`read`] may return: plain integers, for which any bytes the kernel holds are a valid
/// value.
///
/// # Safety
///
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid `Self`: no `bool`, `char`,
/// enum, reference, pointer to be dereferenced, or padding.
pub unsafe trait KernelScalar: Copy {}

macro_rules! kernel_scalar {
    ($($ty:ty),+) => {
        $(
            // SAFETY: a fixed-width integer; every bit pattern is a value.
            unsafe impl KernelScalar for $ty {}
        )+
    };
}
kernel_scalar!(u8, u16, u32, u64, i8, i16, i32, i64);

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub fn read<T: KernelScalar>(base: u64, offset: u32) -> Result<T, i64> {
    if base == 0 || offset == Layout::ABSENT {
        return Err(-1);
    }
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: `value` has room for exactly the size_of::<T>() bytes the helper writes, and the
    // helper checks the source address itself.
    let result = unsafe {
        bpf_probe_read_kernel(
            value.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            (base + offset as u64) as *const core::ffi::c_void,
        )
    };
    if result < 0 {
        return Err(result);
    }
    // SAFETY: the helper succeeded, so every byte was written, and any bytes are a valid `T`
    // (`KernelScalar`).
    Ok(unsafe { value.assume_init() })
}

/// Copies `len` bytes of kernel memory at `src` into `dst`.
///
/// # Safety
///
/// `dst` must be valid for writes of `len` bytes, and nothing else may read or write them during
/// the call. `src` need not be valid: the helper checks it and fails instead.
#[inline(always)]
pub unsafe fn read_into(dst: *mut u8, len: u32, src: u64) -> Result<(), i64> {
    // SAFETY: the caller guarantees `dst`; the helper checks `src`.
    let result = unsafe { bpf_probe_read_kernel(dst.cast(), len, src as *const core::ffi::c_void) };
    if result < 0 {
        Err(result)
    } else {
        Ok(())
    }
}

/// Copies a NUL-terminated kernel string at `src` into `dst`, at most `len` bytes including the
/// NUL, which the helper always writes.
///
/// # Safety
///
/// As for [`read_into`].
#[inline(always)]
pub unsafe fn read_str_into(dst: *mut u8, len: u32, src: u64) -> Result<(), i64> {
    // SAFETY: the caller guarantees `dst`; the helper checks `src`.
    let result =
        unsafe { bpf_probe_read_kernel_str(dst.cast(), len, src as *const core::ffi::c_void) };
    if result < 0 {
        Err(result)
    } else {
        Ok(())
    }
}

/// The memory cgroup of `task`, through `task->cgroups->subsys[memory_cgrp_id]`.
#[inline(always)]
pub fn task_memcg(task: u64) -> u64 {
    let Ok(css_set) = read::<u64>(task, layout!(task_cgroups)) else {
        return 0;
    };
    let slot = layout!(css_set_subsys) + layout!(memory_subsys_id) * 8;
    match read::<u64>(css_set, slot) {
        Ok(css) if css != 0 => css - layout!(memcg_css) as u64,
        _ => 0,
    }
}

/// The memory cgroup of the running task.
#[inline(always)]
pub fn current_memcg() -> u64 {
    // SAFETY: the helper has no preconditions.
    task_memcg(unsafe { bpf_get_current_task() })
}

/// `memcg->css.cgroup->kn->id`: the inode number of the cgroup's directory.
#[inline(always)]
pub fn memcg_cgroup_id(memcg: u64) -> u64 {
    let Ok(cgroup) = read::<u64>(memcg, layout!(memcg_css) + layout!(css_cgroup)) else {
        return 0;
    };
    let Ok(kn) = read::<u64>(cgroup, layout!(cgroup_kn)) else {
        return 0;
    };
    read::<u64>(kn, layout!(kn_id)).unwrap_or(0)
}

#[inline(always)]
pub fn parent_memcg(memcg: u64) -> u64 {
    match read::<u64>(memcg, layout!(memcg_css) + layout!(css_parent)) {
        Ok(css) if css != 0 => css - layout!(memcg_css) as u64,
        _ => 0,
    }
}

/// Where `memcg`'s hierarchical state array starts, in whichever of its layouts this kernel
/// uses; `None` when the pointer to it cannot be read.
#[inline(always)]
pub fn memcg_state(memcg: u64) -> Option<u64> {
    match layout!(stats_scheme) {
        stats_scheme::POINTER => match read::<u64>(memcg, layout!(memcg_vmstats)) {
            Ok(vmstats) if vmstats != 0 => Some(vmstats + layout!(vmstats_state) as u64),
            _ => None,
        },
        stats_scheme::EMBEDDED_STRUCT => {
            Some(memcg + layout!(memcg_vmstats) as u64 + layout!(vmstats_state) as u64)
        }
        _ => Some(memcg + layout!(memcg_vmstats) as u64),
    }
}

/// Entry `index` of a state array found by [`memcg_state`], floored at 0: per-CPU batching can
/// leave a hierarchical counter briefly negative.
#[inline(always)]
pub fn state_item(state: u64, index: u32) -> Result<u64, i64> {
    if index == Layout::ABSENT {
        return Err(-1);
    }
    read::<i64>(state, index * 8).map(|value| value.max(0) as u64)
}

/// Hierarchical page count of LRU list `lru` (`leak_common::layout::LRU_*`) of `memcg`, as of
/// the last statistics flush.
#[inline(always)]
pub fn lru_pages(memcg: u64, lru: usize) -> u64 {
    let Some(state) = memcg_state(memcg) else {
        return 0;
    };
    let index = match lru {
        0 => layout!(lru_stat_index[0]),
        1 => layout!(lru_stat_index[1]),
        2 => layout!(lru_stat_index[2]),
        3 => layout!(lru_stat_index[3]),
        _ => layout!(lru_stat_index[4]),
    };
    state_item(state, index).unwrap_or(0)
}
