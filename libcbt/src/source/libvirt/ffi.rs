//! The libvirt calls the `virt` crate has no safe wrapper for: checkpoints, backup jobs,
//! fsfreeze and the agent timeout. Each function owns every pointer it gets from libvirt and
//! frees it before returning; none keeps a pointer past its call.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

fn cstring(s: &str) -> Result<CString, Error> {
    // An interior NUL cannot come from our own XML builders; refuse rather than truncate.
    CString::new(s).map_err(|_| Error::last_error())
}

/// Takes ownership of a string libvirt allocated.
///
/// # Safety
/// `p` is null or a NUL-terminated string allocated by libvirt with malloc.
unsafe fn take_string(p: *mut c_char) -> Result<String, Error> {
    if p.is_null() {
        return Err(Error::last_error());
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    libc::free(p.cast());
    Ok(s)
}

fn check(rc: c_int) -> Result<c_int, Error> {
    if rc < 0 {
        Err(Error::last_error())
    } else {
        Ok(rc)
    }
}

/// A checkpoint handle, freed on drop.
struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: the pointer came from libvirt and is freed exactly once.
        unsafe {
            sys::virDomainCheckpointFree(self.0);
        }
    }
}

fn lookup(dom: &Domain, name: &str) -> Result<Checkpoint, Error> {
    let n = cstring(name)?;
    // SAFETY: `dom` is alive for the call; `n` outlives it.
    let p = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), n.as_ptr(), 0) };
    if p.is_null() {
        return Err(Error::last_error());
    }
    Ok(Checkpoint(p))
}

/// `virDomainCheckpointCreateXML`; returns nothing, the caller knows the name it asked for.
pub fn checkpoint_create(dom: &Domain, xml: &str, flags: c_uint) -> Result<(), Error> {
    let x = cstring(xml)?;
    // SAFETY: as above; the returned handle is freed at once.
    let p = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), x.as_ptr(), flags) };
    if p.is_null() {
        return Err(Error::last_error());
    }
    drop(Checkpoint(p));
    Ok(())
}

/// `virDomainCheckpointGetXMLDesc` of the checkpoint named `name`.
pub fn checkpoint_xml(dom: &Domain, name: &str, flags: c_uint) -> Result<String, Error> {
    let c = lookup(dom, name)?;
    // SAFETY: `c` is alive for the call; the string is ours to free.
    unsafe { take_string(sys::virDomainCheckpointGetXMLDesc(c.0, flags)) }
}

/// `virDomainCheckpointDelete` of the checkpoint named `name`.
pub fn checkpoint_delete(dom: &Domain, name: &str, flags: c_uint) -> Result<(), Error> {
    let c = lookup(dom, name)?;
    // SAFETY: `c` is alive for the call.
    check(unsafe { sys::virDomainCheckpointDelete(c.0, flags) }).map(|_| ())
}

/// Names of all checkpoints of `dom` (`virDomainListAllCheckpoints`).
pub fn checkpoint_names(dom: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: libvirt allocates `list` and its entries; all are freed below.
    let n = check(unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) })?;
    let mut names = Vec::with_capacity(n as usize);
    let mut failed = None;
    for i in 0..n as usize {
        // SAFETY: `list` holds `n` valid handles; each is wrapped once, so freed once.
        let c = Checkpoint(unsafe { *list.add(i) });
        // SAFETY: the name belongs to the handle; copied before the handle is freed.
        let p = unsafe { sys::virDomainCheckpointGetName(c.0) };
        if p.is_null() {
            failed.get_or_insert_with(Error::last_error);
        } else {
            // SAFETY: non-null, NUL-terminated, owned by `c`, which is alive here.
            names.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
        }
    }
    // SAFETY: the array itself was malloc'ed by libvirt.
    unsafe { libc::free(list.cast()) };
    match failed {
        Some(e) => Err(e),
        None => Ok(names),
    }
}

/// `virDomainBackupBegin`.
pub fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), Error> {
    let b = cstring(backup_xml)?;
    let c = checkpoint_xml.map(cstring).transpose()?;
    let cp = c.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: both strings outlive the call.
    check(unsafe { sys::virDomainBackupBegin(dom.as_ptr(), b.as_ptr(), cp, 0) }).map(|_| ())
}

/// `virDomainBackupGetXMLDesc`: the running backup job's description.
pub fn backup_xml(dom: &Domain) -> Result<String, Error> {
    // SAFETY: the string is ours to free.
    unsafe { take_string(sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0)) }
}

/// `virDomainAbortJob`.
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: plain call on a live handle.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) }).map(|_| ())
}

/// `virDomainFSFreeze` of every filesystem; returns how many were frozen.
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: null mountpoints with count 0 means all.
    check(unsafe { sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut(), 0, 0) }).map(|n| n as u32)
}

/// `virDomainFSThaw` of every filesystem; returns how many were thawed.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: as for freeze.
    check(unsafe { sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut(), 0, 0) }).map(|n| n as u32)
}

/// `virDomainAgentSetResponseTimeout`: seconds, or -2 for libvirt's default.
pub fn agent_timeout(dom: &Domain, seconds: c_int) -> Result<(), Error> {
    // SAFETY: plain call on a live handle.
    check(unsafe { sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), seconds, 0) }).map(|_| ())
}

/// The type of the domain's current job (`VIR_DOMAIN_JOB_NONE` when there is none), from
/// `virDomainGetJobInfo` (the `virt` crate's typed-parameter job stats do not survive "no job").
pub fn job_type(dom: &Domain) -> Result<c_int, Error> {
    // SAFETY: a plain struct of numbers, zeroed, filled by libvirt.
    let mut info: sys::virDomainJobInfo = unsafe { std::mem::zeroed() };
    check(unsafe { sys::virDomainGetJobInfo(dom.as_ptr(), &mut info) })?;
    Ok(info.type_)
}

/// `virDomainBlockPull` of disk `disk` (a target such as `vda`) at most `mib_per_sec` MiB/s
/// (0: no limit): QEMU's `block-stream` copies the disk's backing chain into its top image,
/// then drops the chain.
pub fn block_pull(dom: &Domain, disk: &str, mib_per_sec: u64) -> Result<(), Error> {
    let d = cstring(disk)?;
    let bw = mib_per_sec as std::ffi::c_ulong;
    // SAFETY: `d` outlives the call.
    check(unsafe { sys::virDomainBlockPull(dom.as_ptr(), d.as_ptr(), bw, 0) }).map(|_| ())
}

/// `virDomainGetBlockJobInfo` of disk `disk`: `(cur, end)` of its block job, `None` when it
/// has none.
pub fn block_job_info(dom: &Domain, disk: &str) -> Result<Option<(u64, u64)>, Error> {
    let d = cstring(disk)?;
    // SAFETY: a plain struct of numbers, zeroed, filled by libvirt; `d` outlives the call.
    let mut info: sys::virDomainBlockJobInfo = unsafe { std::mem::zeroed() };
    let rc =
        check(unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), d.as_ptr(), &mut info, 0) })?;
    Ok((rc == 1).then_some((info.cur, info.end)))
}

/// `virDomainBlockJobAbort` of disk `disk`'s block job (asynchronous: the job ends soon).
pub fn block_job_abort(dom: &Domain, disk: &str) -> Result<(), Error> {
    let d = cstring(disk)?;
    // SAFETY: `d` outlives the call.
    check(unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), d.as_ptr(), 0) }).map(|_| ())
}
