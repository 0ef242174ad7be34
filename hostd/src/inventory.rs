//! Instances on this host (libvirt domains) and who owns them.

use std::path::PathBuf;

use libcbt::source::libvirt::{blocking, DomainDisk, LibvirtError, LibvirtSource};
use serde::Serialize;

use crate::config::Config;

/// A domain as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub name: String,
    pub uuid: String,
    pub tenant: Option<String>,
    pub active: bool,
    pub disks: Vec<DomainDisk>,
}

/// Owner of a domain: the config's override, else Nova's project, else the default tenant.
pub fn tenant_for(cfg: &Config, name: &str, uuid: &str, project: Option<&str>) -> Option<String> {
    cfg.instances
        .iter()
        .find(|i| i.domain == name || i.domain.eq_ignore_ascii_case(uuid))
        .map(|i| i.tenant.clone())
        .or_else(|| project.map(String::from))
        .or_else(|| cfg.libvirt.default_tenant.clone())
}

/// Every domain of the host.
pub async fn list(cfg: &Config, src: &LibvirtSource) -> Result<Vec<Instance>, LibvirtError> {
    let (s, c) = (src.clone(), cfg.clone());
    blocking(move || {
        let mut out = Vec::new();
        for d in s.domains()? {
            let Ok(desc) = d.describe() else { continue };
            out.push(Instance {
                tenant: tenant_for(&c, &desc.name, &desc.uuid, desc.project.as_deref()),
                active: d.is_active().unwrap_or(false),
                name: desc.name,
                uuid: desc.uuid,
                disks: desc.disks,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    })
    .await
}

/// One domain by name or UUID.
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
        let desc = d.describe()?;
        Ok(Some(Instance {
            tenant: tenant_for(&c, &desc.name, &desc.uuid, desc.project.as_deref()),
            active: d.is_active()?,
            name: desc.name,
            uuid: desc.uuid,
            disks: desc.disks,
        }))
    })
    .await
}

/// The domain XML of a staging copy: new name, no UUID (libvirt makes one), each restored
/// disk pointing at its new qcow2 file, every other disk and every network interface left
/// out (so the copy can never touch the original's volumes or take its addresses), and
/// file-backed consoles written beside the original's with the new name.
pub fn staging_xml(xml: &str, name: &str, disks: &[(String, PathBuf)]) -> Result<String, String> {
    use libcbt::source::libvirt::xml::esc;
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("saved domain XML: {e}"))?;
    let root = doc.root_element();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for n in root.children().filter(|n| n.is_element()) {
        match n.tag_name().name() {
            "name" => edits.push((n.range(), format!("<name>{}</name>", esc(name)))),
            "uuid" => edits.push((n.range(), String::new())),
            "devices" => {
                for d in n.children().filter(|n| n.is_element()) {
                    match d.tag_name().name() {
                        "disk" => {
                            let target = d.children().find(|c| c.has_tag_name("target"));
                            let dev = target.and_then(|t| t.attribute("dev")).unwrap_or("");
                            let bus = target.and_then(|t| t.attribute("bus")).unwrap_or("virtio");
                            match disks.iter().find(|(t, _)| t == dev) {
                                Some((_, path))
                                    if d.attribute("device").unwrap_or("disk") == "disk" =>
                                {
                                    edits.push((
                                        d.range(),
                                        format!(
                                            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                                             <source file='{}'/><target dev='{}' bus='{}'/></disk>",
                                            esc(&path.display().to_string()),
                                            esc(dev),
                                            esc(bus)
                                        ),
                                    ));
                                }
                                _ => edits.push((d.range(), String::new())),
                            }
                        }
                        "interface" => edits.push((d.range(), String::new())),
                        "serial" | "console" if d.attribute("type") == Some("file") => {
                            if let Some(s) = d.children().find(|c| c.has_tag_name("source")) {
                                if let Some(p) = s.attribute("path") {
                                    edits.push((
                                        s.range(),
                                        format!("<source path='{}-{}'/>", esc(p), esc(name)),
                                    ));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, s) in edits {
        out.replace_range(r, &s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_copy_touches_nothing_of_the_original() {
        let x = "<domain type='kvm'><name>vm</name><uuid>u-1</uuid><metadata><p/></metadata><devices>\
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/a'/><target dev='vda' bus='scsi'/></disk>\
            <disk type='file' device='disk'><source file='/x/b.qcow2'/><target dev='vdb' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><target dev='sda'/></disk>\
            <interface type='network'><mac address='52:54:00:00:00:01'/></interface>\
            <serial type='file'><source path='/x/console.log'/></serial></devices></domain>";
        let out = staging_xml(
            x,
            "vm-staging",
            &[("vda".into(), PathBuf::from("/r/vda.qcow2"))],
        )
        .expect("ok");
        let d = libcbt::source::libvirt::xml::domain(&out).expect("parses");
        assert_eq!(d.name, "vm-staging");
        assert_eq!(d.uuid, "");
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].source.path(), Some("/r/vda.qcow2"));
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert!(out.contains("bus='scsi'"));
        assert!(!out.contains("/dev/vg/a") && !out.contains("b.qcow2") && !out.contains("52:54"));
        assert!(out.contains("/x/console.log-vm-staging"));
        assert!(out.contains("<metadata><p/></metadata>"));
    }
}
