//! Instances on this host (libvirt domains), who owns them, and the domain XML of staging
//! copies.
//!
//! # Finding an instance
//!
//! An id that parses as a UUID (libvirt's rules, [`parse_uuid`]) is looked up by UUID only,
//! anything else by name only: a domain named like another instance's UUID never stands in
//! for it. Staging copies may not take such names ([`reserved_staging_name`]).
//!
//! # Owner of a domain, first match wins
//!
//! | source | why |
//! |---|---|
//! | our staging record in `<metadata>` ([`StagingMeta`]) | a copy belongs to the tenant that restored it, whatever it is named and whoever owns the original |
//! | `[[instance]]` in the config: by UUID when its `domain` parses as one, else by name | the operator's word |
//! | Nova's `<nova:project uuid>` | Nova instances |
//! | `libvirt.default_tenant` | everything else |
//!
//! # What a staging copy keeps of the original's XML
//!
//! The copy is built from an allow-list: anything not listed is left out, so an element
//! libvirt adds tomorrow cannot make a copy share the original's host resources.
//!
//! | element | in the copy | why |
//! |---|---|---|
//! | `<domain type>` | kept | the hypervisor |
//! | `<name>` | the new name | |
//! | `<uuid>`, `<genid>` | dropped | libvirt makes new ones |
//! | `<metadata>` | only our staging record | Nova's metadata would make the copy claim the original's project and instance |
//! | `<memory>`, `<currentMemory>`, `<maxMemory>` | kept | sizes only |
//! | `<vcpu>` | count and `current` only | `cpuset` pins to the original's host CPUs |
//! | `<iothreads>`, `<iothreadids>` | kept | ids controllers may name |
//! | `<cpu>`, `<features>`, `<clock>`, `<pm>`, `<on_poweroff>`, `<on_reboot>`, `<on_crash>`, `<on_lockfailure>` | kept | what the guest sees, no host paths |
//! | `<os><type>`, `<boot>`, `<bootmenu>` | kept | |
//! | `<os><kernel>`, `<initrd>`, `<cmdline>` | kept when the kernel and initrd are files every local user may read | read-only inputs QEMU loads at start; the check keeps a saved XML from a hostile sink from loading a private host file into the guest |
//! | `<os><loader>`, `<nvram>` | dropped; a UEFI original (`firmware='efi'` or a pflash loader) gets `firmware='efi'` | libvirt selects the firmware and makes the copy its own NVRAM from the template, never the original's |
//! | `<os><firmware>` | kept with `firmware='efi'` | firmware selection criteria only |
//! | `<os><smbios>`, `<acpi>`, `<bios>`, `<dtb>`, `<init…>` | dropped | host files or host SMBIOS |
//! | `<sysinfo>`, `<cputune>`, `<numatune>`, `<memtune>`, `<blkiotune>`, `<memoryBacking>`, `<resource>`, `<perf>`, `<idmap>`, `<seclabel>`, `<keywrap>`, `<launchSecurity>`, `<throttlegroups>`, `<qemu:*>`, anything else | dropped | host pinning, host memory files, security labels, raw QEMU arguments |
//! | `<devices><emulator>` | dropped | libvirt uses the host's default for the arch and machine (a hostile saved XML cannot choose a binary) |
//! | `<disk>` | only the restored disks, rebuilt: new qcow2 file, same target, bus and boot order | the original's volumes are never touched |
//! | `<controller>` | kept | buses the disks and inputs sit on |
//! | `<input>` | `mouse`, `keyboard`, `tablet` only, without addresses | `passthrough`/`evdev` are host devices |
//! | `<graphics>` | `vnc`/`spice` rebuilt as `<listen type='none'/>` | no TCP port or socket shared with the original or open to local users; reachable through libvirt only |
//! | `<video>` | model and sizes only | `<driver name='vhostuser'>` and 3D acceleration use host devices |
//! | `<memballoon>` | model only | |
//! | `<rng>` | `builtin` or `random` backends, rebuilt on `/dev/urandom` | `egd` backends are host sockets |
//! | `<channel>` | the guest agent's unix channel, without a source path | libvirt makes the socket per domain |
//! | `<serial>`, `<console>` | any type, rebuilt as `pty` with the same port | file, log, socket, tcp and device back-ends are host resources |
//! | `<interface>`, `<hostdev>`, `<filesystem>`, `<shmem>`, `<redirdev>`, `<redirfilter>`, `<smartcard>`, `<tpm>`, `<watchdog>`, `<panic>`, `<sound>`, `<audio>`, `<parallel>`, `<hub>`, `<lease>`, `<memory>`, `<vsock>`, `<iommu>`, `<crypto>`, `<nvram>`, `<pstore>`, anything else | dropped | addresses, host devices, shared memory, host files, lock leases |

use std::path::PathBuf;

use libcbt::source::libvirt::xml::{esc, StagingMeta, MAX_XML};
use libcbt::source::libvirt::{
    blocking, parse_uuid, DomainDesc, DomainDisk, LibvirtError, LibvirtSource,
};
use roxmltree::Node;
use serde::Serialize;

use crate::config::{Config, InstanceCfg};

/// A domain as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub name: String,
    pub uuid: String,
    pub tenant: Option<String>,
    pub active: bool,
    pub disks: Vec<DomainDisk>,
}

/// Whether `[[instance]]` entry `i` is the domain `name`/`uuid`: by UUID when the entry names
/// a UUID, else by name.
fn override_matches(i: &InstanceCfg, name: &str, uuid: &str) -> bool {
    match parse_uuid(&i.domain) {
        Some(u) => parse_uuid(uuid) == Some(u),
        None => i.domain == name,
    }
}

/// Owner of a domain without a staging record: the config's override, else Nova's project,
/// else the default tenant. Prefer [`tenant_of`], which honours a staging copy's record.
pub fn tenant_for(cfg: &Config, name: &str, uuid: &str, project: Option<&str>) -> Option<String> {
    cfg.instances
        .iter()
        .find(|i| override_matches(i, name, uuid))
        .map(|i| i.tenant.clone())
        .or_else(|| project.map(String::from))
        .or_else(|| cfg.libvirt.default_tenant.clone())
}

/// Owner of a described domain (live, or from the XML saved with a backup): the tenant its
/// staging record names, else [`tenant_for`].
pub fn tenant_of(cfg: &Config, d: &DomainDesc) -> Option<String> {
    match &d.staging {
        Some(s) => Some(s.tenant.clone()),
        None => tenant_for(cfg, &d.name, &d.uuid, d.project.as_deref()),
    }
}

/// Whether `name` may not name a staging copy: it parses as a UUID (libvirt would look it up
/// as one) or looks like Nova's `instance-%08x` (`instance-` and 8 or more hex digits).
pub fn reserved_staging_name(name: &str) -> bool {
    if parse_uuid(name).is_some() {
        return true;
    }
    name.get(..9)
        .filter(|p| p.eq_ignore_ascii_case("instance-"))
        .map(|_| &name[9..])
        .is_some_and(|rest| rest.len() >= 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn instance(cfg: &Config, desc: DomainDesc, active: bool) -> Instance {
    Instance {
        tenant: tenant_of(cfg, &desc),
        active,
        name: desc.name,
        uuid: desc.uuid,
        disks: desc.disks,
    }
}

/// Every domain of the host.
pub async fn list(cfg: &Config, src: &LibvirtSource) -> Result<Vec<Instance>, LibvirtError> {
    let (s, c) = (src.clone(), cfg.clone());
    blocking(move || {
        let mut out = Vec::new();
        for d in s.domains()? {
            if !c.libvirt.serves(d.name()) {
                continue;
            }
            let Ok(desc) = d.describe() else { continue };
            out.push(instance(&c, desc, d.is_active().unwrap_or(false)));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    })
    .await
}

/// One domain: by UUID when `id` parses as a UUID, else by name; never both.
pub async fn get(
    cfg: &Config,
    src: &LibvirtSource,
    id: &str,
) -> Result<Option<Instance>, LibvirtError> {
    if id.is_empty() || id.len() > 128 || id.contains('/') {
        return Ok(None);
    }
    let (s, c, id) = (src.clone(), cfg.clone(), id.to_string());
    blocking(move || {
        let d = match s.domain(&id) {
            Ok(d) => d,
            Err(LibvirtError::NoSuchDomain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if !c.libvirt.serves(d.name()) {
            return Ok(None);
        }
        let desc = d.describe()?;
        Ok(Some(instance(&c, desc, d.is_active()?)))
    })
    .await
}

/// Why a staging copy's XML could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("the saved domain XML does not parse: {0}")]
    Parse(String),
    #[error("the saved domain XML is over {MAX_XML} bytes")]
    TooLarge,
    #[error("{0:?} cannot name a staging copy: it looks like a UUID or a Nova instance")]
    ReservedName(String),
}

fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

fn first<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    elements(n).find(|c| c.has_tag_name(name))
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A regular file every local user may read (so loading it into a guest discloses nothing):
/// readable by others, and every directory above it searchable by others.
fn world_readable(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(p) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(md) = std::fs::metadata(&p) else {
        return false;
    };
    md.is_file()
        && md.mode() & 0o004 != 0
        && p.ancestors()
            .skip(1)
            .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// `<os>` of the copy (see the module table).
fn staging_os(xml: &str, os: Node<'_, '_>) -> String {
    let efi = os.attribute("firmware") == Some("efi")
        || first(os, "loader").is_some_and(|l| l.attribute("type") == Some("pflash"));
    let mut out = String::from(if efi { "<os firmware='efi'>" } else { "<os>" });
    let text = |n: Node<'_, '_>| n.text().map(str::trim).unwrap_or("").to_string();
    let kernel = first(os, "kernel").map(text);
    let initrd = first(os, "initrd").map(text);
    let kernel_ok = kernel.as_deref().is_some_and(world_readable)
        && initrd.as_deref().is_none_or(world_readable);
    for c in elements(os) {
        match c.tag_name().name() {
            "type" | "boot" | "bootmenu" => out += &xml[c.range()],
            "firmware" if efi => out += &xml[c.range()],
            "kernel" | "initrd" | "cmdline" if kernel_ok => out += &xml[c.range()],
            _ => {}
        }
    }
    out + "</os>"
}

fn attr<'a>(n: Option<Node<'a, '_>>, a: &str) -> &'a str {
    n.and_then(|n| n.attribute(a)).unwrap_or("")
}

/// `<devices>` of the copy (see the module table).
fn staging_devices(xml: &str, devices: Node<'_, '_>, disks: &[(String, PathBuf)]) -> String {
    let mut out = String::from("<devices>");
    for d in elements(devices) {
        match d.tag_name().name() {
            "disk" if d.attribute("device").unwrap_or("disk") == "disk" => {
                let target = first(d, "target");
                let dev = attr(target, "dev");
                let Some((_, path)) = disks.iter().find(|(t, _)| t == dev) else {
                    continue;
                };
                let bus = target.and_then(|t| t.attribute("bus")).unwrap_or("virtio");
                let boot = attr(first(d, "boot"), "order");
                out += &format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                     <source file='{}'/><target dev='{}' bus='{}'/>{}</disk>",
                    esc(&path.display().to_string()),
                    esc(dev),
                    esc(bus),
                    if digits(boot) {
                        format!("<boot order='{boot}'/>")
                    } else {
                        String::new()
                    }
                );
            }
            "controller" => out += &xml[d.range()],
            "input" => {
                let t = d.attribute("type").unwrap_or("");
                if ["mouse", "keyboard", "tablet"].contains(&t) {
                    let bus = d
                        .attribute("bus")
                        .map(|b| format!(" bus='{}'", esc(b)))
                        .unwrap_or_default();
                    out += &format!("<input type='{t}'{bus}/>");
                }
            }
            "graphics" => {
                let t = d.attribute("type").unwrap_or("");
                if t == "vnc" || t == "spice" {
                    out += &format!("<graphics type='{t}'><listen type='none'/></graphics>");
                }
            }
            "video" => {
                let m = first(d, "model");
                let mut a = String::new();
                if let Some(t) = m.and_then(|m| m.attribute("type")) {
                    a += &format!(" type='{}'", esc(t));
                }
                for k in ["vram", "vram64", "ram", "vgamem", "heads"] {
                    let v = attr(m, k);
                    if digits(v) {
                        a += &format!(" {k}='{v}'");
                    }
                }
                out += &format!("<video><model{a}/></video>");
            }
            "memballoon" => {
                let m = d.attribute("model").unwrap_or("none");
                out += &format!("<memballoon model='{}'/>", esc(m));
            }
            "rng" => {
                let model = d.attribute("model").unwrap_or("virtio");
                let backend = match first(d, "backend").and_then(|b| b.attribute("model")) {
                    Some("builtin") => "<backend model='builtin'/>",
                    Some("random") => "<backend model='random'>/dev/urandom</backend>",
                    _ => continue,
                };
                out += &format!("<rng model='{}'>{backend}</rng>", esc(model));
            }
            "channel" => {
                let t = first(d, "target");
                let agent = d.attribute("type") == Some("unix")
                    && attr(t, "type") == "virtio"
                    && attr(t, "name") == "org.qemu.guest_agent.0";
                if agent {
                    out += "<channel type='unix'>\
                            <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
                }
            }
            kind @ ("serial" | "console") => {
                let t = first(d, "target");
                let port = attr(t, "port");
                let port = if digits(port) {
                    format!(" port='{port}'")
                } else {
                    String::new()
                };
                if kind == "serial" {
                    out += &format!("<serial type='pty'><target{port}/></serial>");
                } else {
                    let tt = match attr(t, "type") {
                        "" | "serial" => "serial",
                        "virtio" => "virtio",
                        _ => continue,
                    };
                    out += &format!("<console type='pty'><target type='{tt}'{port}/></console>");
                }
            }
            _ => {}
        }
    }
    out + "</devices>"
}

/// The domain XML of a staging copy of `xml` (the original's, as saved with its backup): named
/// `name`, with the restored disks `disks` (target, new qcow2 file) and nothing else of the
/// original's host resources (module table), recording `record` (tenant, source UUID, backup
/// id) in its `<metadata>`.
pub fn staging_domain_xml(
    xml: &str,
    name: &str,
    disks: &[(String, PathBuf)],
    record: &StagingMeta,
) -> Result<String, StagingError> {
    build_staging(xml, name, disks, Some(record))
}

/// [`staging_domain_xml`] without a staging record: the copy's tenant is then derived like
/// any domain's. Kept for callers not yet passing the record; use [`staging_domain_xml`].
pub fn staging_xml(xml: &str, name: &str, disks: &[(String, PathBuf)]) -> Result<String, String> {
    build_staging(xml, name, disks, None).map_err(|e| e.to_string())
}

fn build_staging(
    xml: &str,
    name: &str,
    disks: &[(String, PathBuf)],
    record: Option<&StagingMeta>,
) -> Result<String, StagingError> {
    if reserved_staging_name(name) {
        return Err(StagingError::ReservedName(name.to_string()));
    }
    if xml.len() > MAX_XML {
        return Err(StagingError::TooLarge);
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| StagingError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(StagingError::Parse(
            "the root element is not <domain>".into(),
        ));
    }
    let mut out = format!(
        "<domain type='{}'><name>{}</name>",
        esc(root.attribute("type").unwrap_or("kvm")),
        esc(name)
    );
    if let Some(r) = record {
        out += &format!("<metadata>{}</metadata>", r.to_xml());
    }
    for n in elements(root) {
        // Elements in a namespace (qemu:commandline, …) are never libvirt's own.
        if n.tag_name().namespace().is_some() {
            continue;
        }
        match n.tag_name().name() {
            "memory" | "currentMemory" | "maxMemory" | "iothreads" | "iothreadids" | "cpu"
            | "features" | "clock" | "pm" | "on_poweroff" | "on_reboot" | "on_crash"
            | "on_lockfailure" => out += &xml[n.range()],
            "vcpu" => {
                let count = n.text().map(str::trim).unwrap_or("");
                if digits(count) {
                    let current = n
                        .attribute("current")
                        .filter(|c| digits(c))
                        .map(|c| format!(" current='{c}'"))
                        .unwrap_or_default();
                    out += &format!("<vcpu{current}>{count}</vcpu>");
                }
            }
            "os" => out += &staging_os(xml, n),
            "devices" => out += &staging_devices(xml, n, disks),
            _ => {}
        }
    }
    Ok(out + "</domain>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcbt::source::libvirt::xml;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let base = Config::embedded_default(Path::new("/tmp/x"), &"0".repeat(64));
        let t = format!("{base}\n{extra}");
        toml::from_str(&t).expect("config")
    }

    #[test]
    fn staging_copy_touches_nothing_of_the_original() {
        let x = "<domain type='kvm'><name>vm</name><uuid>u-1</uuid><metadata><p/></metadata><devices>\
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/a'/><target dev='vda' bus='scsi'/></disk>\
            <disk type='file' device='disk'><source file='/x/b.qcow2'/><target dev='vdb' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><target dev='sda'/></disk>\
            <interface type='network'><mac address='52:54:00:00:00:01'/></interface>\
            <serial type='file'><source path='/x/console.log'/></serial></devices></domain>";
        let rec = StagingMeta {
            tenant: "p-a".into(),
            source: "d164e3bc-ac33-4206-b894-dba491c0a8a4".into(),
            backup: "b1".into(),
        };
        let out = staging_domain_xml(
            x,
            "vm-staging",
            &[("vda".into(), PathBuf::from("/r/vda.qcow2"))],
            &rec,
        )
        .expect("ok");
        let d = xml::domain(&out).expect("parses");
        assert_eq!(d.name, "vm-staging");
        assert_eq!(d.uuid, "");
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].source.path(), Some("/r/vda.qcow2"));
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(d.staging, Some(rec));
        assert!(out.contains("bus='scsi'"));
        assert!(!out.contains("/dev/vg/a") && !out.contains("b.qcow2") && !out.contains("52:54"));
        assert!(!out.contains("console.log") && !out.contains("<p/>"));
        assert!(out.contains("<serial type='pty'>"), "{out}");
    }

    /// A domain with every element that would share a host resource with the original.
    fn rich(kernel: &str, initrd: &str) -> String {
        format!(
            r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>orig</name><uuid>d164e3bc-ac33-4206-b894-dba491c0a8a4</uuid><genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <title>t</title>
  <metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:owner>
    <nova:project uuid="p-orig">x</nova:project></nova:owner></nova:instance>
    <cbt:staging xmlns:cbt="https://cbt.invalid/staging/1" tenant="forged" source="s" backup="b"/></metadata>
  <memory unit='KiB'>262144</memory><currentMemory unit='KiB'>262144</currentMemory>
  <memoryBacking><hugepages/><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu placement='static' cpuset='2-3' current='1'>2</vcpu>
  <iothreads>1</iothreads>
  <cputune><vcpupin vcpu='0' cpuset='2'/></cputune>
  <numatune><memory mode='strict' nodeset='0'/></numatune>
  <memtune><hard_limit unit='KiB'>1</hard_limit></memtune>
  <blkiotune><device><path>/dev/sda</path><weight>500</weight></device></blkiotune>
  <resource><partition>/machine/secret</partition></resource>
  <sysinfo type='smbios'><system><entry name='serial'>HOSTSERIAL</entry></system></sysinfo>
  <os firmware='efi'><type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='no' type='pflash'>/var/lib/x/LOADER.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/orig_VARS.fd</nvram>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0</cmdline>
    <dtb>/boot/DTB</dtb><smbios mode='sysinfo'/><acpi><table type='slic'>/x/SLIC.bin</table></acpi>
    <boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-model'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <perf><event name='cmt' enabled='yes'/></perf>
  <seclabel type='static' model='selinux' relabel='no'><label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>
  <devices>
    <emulator>/tmp/EVILQEMU</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' iothread='1'/>
      <source file='/var/lib/ORIGVDA.qcow2'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>
    <disk type='block' device='lun'><source dev='/dev/ORIGLUN'/><target dev='sdb' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><source file='/x/ORIGISO.iso'/><target dev='sdc' bus='sata'/></disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <controller type='virtio-serial' index='0'/>
    <filesystem type='mount' accessmode='passthrough'><source dir='/HOSTSHARE'/><target dir='tag'/></filesystem>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='ORIGBR'/></interface>
    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x3' slot='0' function='0'/></source></hostdev>
    <shmem name='ORIGSHMEM'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='REDIRHOST' service='4000'/></redirdev>
    <redirfilter><usbdev allow='yes'/></redirfilter>
    <smartcard mode='passthrough' type='tcp'><source mode='bind' host='SMARTCARD' service='2001'/></smartcard>
    <tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/TPM0'/></backend></tpm>
    <watchdog model='i6300esb' action='dump'/>
    <panic model='isa'/>
    <sound model='ich6'/><audio id='1' type='spice'/>
    <parallel type='file'><source path='/x/PARALLEL.log'/></parallel>
    <serial type='file'><source path='/x/SERIALFILE.log'/><log file='/x/SERIALLOG.log'/><target port='0'/></serial>
    <serial type='tcp'><source mode='bind' host='0.0.0.0' service='SERIALTCP'/><target port='1'/></serial>
    <console type='unix'><source mode='bind' path='/x/CONSOLESOCK'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/x/AGENTSOCK'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <channel type='unix'><source mode='bind' path='/x/OTHERCHAN'/><target type='virtio' name='org.other.0'/></channel>
    <input type='tablet' bus='usb'/><input type='passthrough' bus='virtio'><source evdev='/dev/input/EVDEV'/></input>
    <input type='evdev'><source dev='/dev/input/EVDEV2'/></input>
    <graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0' passwd='VNCPASS'><listen type='address' address='0.0.0.0'/></graphics>
    <graphics type='spice'><listen type='socket' socket='/x/SPICESOCK'/><gl enable='yes' rendernode='/dev/dri/RENDER'/></graphics>
    <graphics type='sdl' display=':0' xauth='/root/XAUTH'/>
    <video><model type='virtio' heads='1' vram='16384'><acceleration accel3d='yes'/></model><driver name='vhostuser'/><source path='/x/VHOSTUSER'/></video>
    <memballoon model='virtio'><stats period='10'/></memballoon>
    <rng model='virtio'><backend model='random'>/dev/HWRNG</backend></rng>
    <rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='EGDHOST' service='708'/></backend></rng>
    <hub type='usb'/>
    <lease><lockspace>LOCKSPACE</lockspace><key>k</key><target path='/x/LEASE'/></lease>
    <memory model='nvdimm'><source><path>/x/NVDIMM</path></source><target><size unit='KiB'>1</size></target></memory>
    <vsock model='virtio'><cid auto='no' address='VSOCKCID'/></vsock>
    <iommu model='intel'/>
    <crypto model='virtio' type='qemu'><backend model='builtin' queues='1'/></crypto>
    <pstore backend='acpi-erst'><path>/x/PSTORE</path><size unit='KiB'>8</size></pstore>
  </devices>
  <qemu:commandline><qemu:arg value='-chardev'/><qemu:arg value='file,path=/QEMUCMDLINE'/></qemu:commandline>
  <qemu:override><qemu:device alias='x'/></qemu:override>
</domain>"#
        )
    }

    #[test]
    fn staging_copy_keeps_only_the_allow_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let (k, i) = (dir.path().join("vmlinuz"), dir.path().join("initrd.gz"));
        std::fs::write(&k, b"k").expect("kernel");
        std::fs::write(&i, b"i").expect("initrd");
        for f in [&k, &i] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let x = rich(&k.display().to_string(), &i.display().to_string());
        let rec = StagingMeta {
            tenant: "p-a".into(),
            source: "d164e3bc-ac33-4206-b894-dba491c0a8a4".into(),
            backup: "b7".into(),
        };
        let out = staging_domain_xml(
            &x,
            "copy-1",
            &[("vda".into(), PathBuf::from("/restores/copy-1/vda.qcow2"))],
            &rec,
        )
        .expect("builds");
        for bad in [
            "d164e3bc-ac33-4206-b894-dba491c0a8a4'", // the original's UUID as <uuid>
            "<uuid>",
            "<genid>",
            "<title>",
            "p-orig",
            "forged",
            "hugepages",
            "memoryBacking",
            "cpuset",
            "cputune",
            "numatune",
            "memtune",
            "blkiotune",
            "secret",
            "HOSTSERIAL",
            "LOADER",
            "nvram",
            "DTB",
            "smbios",
            "SLIC",
            "cmt",
            "seclabel",
            "svirt",
            "EVILQEMU",
            "emulator",
            "ORIGVDA",
            "ORIGLUN",
            "ORIGISO",
            "HOSTSHARE",
            "filesystem",
            "ORIGBR",
            "52:54:00",
            "interface",
            "hostdev",
            "ORIGSHMEM",
            "shmem",
            "REDIRHOST",
            "redirdev",
            "redirfilter",
            "SMARTCARD",
            "smartcard",
            "TPM0",
            "tpm",
            "watchdog",
            "panic",
            "sound",
            "audio",
            "PARALLEL",
            "parallel",
            "SERIALFILE",
            "SERIALLOG",
            "SERIALTCP",
            "<log",
            "type='tcp'",
            "CONSOLESOCK",
            "AGENTSOCK",
            "spicevmc",
            "OTHERCHAN",
            "EVDEV",
            "passthrough",
            "5901",
            "0.0.0.0",
            "VNCPASS",
            "SPICESOCK",
            "RENDER",
            "sdl",
            "XAUTH",
            "accel3d",
            "vhostuser",
            "VHOSTUSER",
            "stats",
            "HWRNG",
            "EGDHOST",
            "egd",
            "<hub",
            "LOCKSPACE",
            "LEASE",
            "NVDIMM",
            "nvdimm",
            "VSOCKCID",
            "vsock",
            "iommu",
            "crypto",
            "PSTORE",
            "pstore",
            "qemu:",
            "QEMUCMDLINE",
            "iothread='1'",
        ] {
            assert!(!out.contains(bad), "{bad:?} survived in {out}");
        }
        let d = xml::domain(&out).expect("parses");
        assert_eq!(
            d.staging,
            Some(rec),
            "the record is ours, not the forged one"
        );
        assert_eq!(d.project, None);
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].source.path(), Some("/restores/copy-1/vda.qcow2"));
        for good in [
            "<os firmware='efi'>",
            "machine='pc'",
            "<kernel>",
            "<initrd>",
            "<cmdline>",
            "<boot dev='hd'/>",
            "<features><acpi/><apic/></features>",
            "<cpu mode='host-model'/>",
            "<clock offset='utc'/>",
            "<on_reboot>restart</on_reboot>",
            "<memory unit='KiB'>262144</memory>",
            "<vcpu current='1'>2</vcpu>",
            "<iothreads>1</iothreads>",
            "<boot order='1'/>",
            "<controller type='virtio-serial' index='0'/>",
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
            "<serial type='pty'><target port='0'/></serial>",
            "<serial type='pty'><target port='1'/></serial>",
            "<console type='pty'><target type='serial' port='0'/></console>",
            "<input type='tablet' bus='usb'/>",
            "<graphics type='vnc'><listen type='none'/></graphics>",
            "<graphics type='spice'><listen type='none'/></graphics>",
            "<video><model type='virtio' vram='16384' heads='1'/></video>",
            "<memballoon model='virtio'/>",
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
        ] {
            assert!(out.contains(good), "{good:?} missing from {out}");
        }
        // A kernel only root may read is not loaded into the copy (nor its initrd/cmdline).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&i, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let out = staging_domain_xml(
            &x,
            "copy-1",
            &[],
            &StagingMeta {
                tenant: "t".into(),
                source: "s".into(),
                backup: "b".into(),
            },
        )
        .expect("builds");
        assert!(
            !out.contains("<kernel>") && !out.contains("<initrd>") && !out.contains("<cmdline>")
        );
        let out = staging_xml(&rich("/etc/shadow", "/etc/shadow"), "copy-2", &[]).expect("builds");
        assert!(!out.contains("shadow"), "{out}");
        assert!(!out.contains("cbt:staging"));
    }

    #[test]
    fn staging_names_that_look_like_instances_are_reserved() {
        for r in [
            "d164e3bc-ac33-4206-b894-dba491c0a8a4",
            "D164E3BCAC334206B894DBA491C0A8A4",
            "instance-0000002a",
            "instance-00000001f",
            "INSTANCE-0000ABCD",
        ] {
            assert!(reserved_staging_name(r), "{r}");
            assert!(matches!(
                staging_xml("<domain><name>x</name></domain>", r, &[]),
                Err(e) if e.contains("cannot name a staging copy")
            ));
        }
        for ok in [
            "instance-1",
            "instance-0000002g",
            "vm-staging",
            "instance-",
            "d164e3bc",
        ] {
            assert!(!reserved_staging_name(ok), "{ok}");
        }
    }

    #[test]
    fn a_recorded_tenant_comes_before_override_project_and_default() {
        let uuid = "d164e3bc-ac33-4206-b894-dba491c0a8a4";
        let c = cfg(&format!(
            "[[instance]]\ndomain = \"{uuid}\"\ntenant = \"by-uuid\"\n\
             [[instance]]\ndomain = \"web1\"\ntenant = \"by-name\"\n"
        ));
        let desc =
            |name: &str, uuid: &str, project: Option<&str>, staging: Option<&str>| DomainDesc {
                name: name.into(),
                uuid: uuid.into(),
                project: project.map(String::from),
                staging: staging.map(|t| StagingMeta {
                    tenant: t.into(),
                    source: "s".into(),
                    backup: "b".into(),
                }),
                disks: vec![],
            };
        let other = "00000000-0000-0000-0000-000000000001";
        assert_eq!(
            tenant_of(&c, &desc("x", uuid, Some("p"), Some("p-a"))).as_deref(),
            Some("p-a")
        );
        assert_eq!(
            tenant_of(&c, &desc("web1", other, Some("p"), Some("p-a"))).as_deref(),
            Some("p-a")
        );
        assert_eq!(
            tenant_of(&c, &desc("x", uuid, Some("p"), None)).as_deref(),
            Some("by-uuid")
        );
        assert_eq!(
            tenant_of(&c, &desc("x", &uuid.to_uppercase(), None, None)).as_deref(),
            Some("by-uuid")
        );
        assert_eq!(
            tenant_of(&c, &desc("web1", other, Some("p"), None)).as_deref(),
            Some("by-name")
        );
        // A domain *named* like the override's UUID is not that instance.
        assert_eq!(
            tenant_of(&c, &desc(uuid, other, Some("p"), None)).as_deref(),
            Some("p")
        );
        assert_eq!(
            tenant_of(&c, &desc("y", other, Some("p"), None)).as_deref(),
            Some("p")
        );
        assert_eq!(
            tenant_of(&c, &desc("y", other, None, None)).as_deref(),
            Some("demo")
        );
        assert_eq!(
            tenant_of(&c, &desc("y", other, None, Some("p-a"))).as_deref(),
            Some("p-a")
        );
    }
}
