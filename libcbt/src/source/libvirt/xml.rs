//! The libvirt XML this source reads (domain, checkpoint, backup job) and writes (checkpoint,
//! backup). Parsing is tolerant of elements it does not know and strict about the attributes it
//! uses; every value it returns is bounded (XML from libvirt is trusted less than our own).

use roxmltree::{Document, Node};
use serde::Serialize;

/// Longest XML accepted from libvirt (a domain with hundreds of disks is a few hundred KiB).
pub const MAX_XML: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("libvirt XML of {what} is {len} bytes, over the limit of {MAX_XML}")]
    TooLarge { what: &'static str, len: usize },
    #[error("libvirt XML of {what} does not parse: {msg}")]
    Parse { what: &'static str, msg: String },
    #[error("libvirt XML of {what} lacks {missing}")]
    Missing {
        what: &'static str,
        missing: &'static str,
    },
    #[error("libvirt XML of {what} has an invalid {field}")]
    Invalid {
        what: &'static str,
        field: &'static str,
    },
}

fn parse<'a>(what: &'static str, xml: &'a str) -> Result<Document<'a>, XmlError> {
    if xml.len() > MAX_XML {
        return Err(XmlError::TooLarge {
            what,
            len: xml.len(),
        });
    }
    Document::parse(xml).map_err(|e| XmlError::Parse {
        what,
        msg: e.to_string(),
    })
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.has_tag_name(name))
}

fn children<'a, 'i: 'a>(n: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    n.children()
        .filter(move |c| c.is_element() && c.has_tag_name(name))
}

fn text(n: Option<Node<'_, '_>>) -> Option<String> {
    n.and_then(|n| n.text()).map(|t| t.trim().to_string())
}

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DiskSource {
    File { path: String },
    Block { path: String },
    Network { protocol: String, name: String },
    Volume { pool: String, volume: String },
    Other { kind: String },
}

impl DiskSource {
    /// The host path of a file or block disk.
    pub fn path(&self) -> Option<&str> {
        match self {
            DiskSource::File { path } | DiskSource::Block { path } => Some(path),
            _ => None,
        }
    }
}

/// One `<disk device='disk'>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainDisk {
    /// `<target dev>`: `vda`, `sdb` …; libvirt's name for the disk in checkpoints and backups.
    pub target: String,
    /// `<driver type>`: `qcow2`, `raw` …
    pub format: Option<String>,
    pub source: DiskSource,
    pub readonly: bool,
}

impl DomainDisk {
    /// Only qcow2 images hold persistent bitmaps, so only they can be tracked.
    pub fn trackable(&self) -> bool {
        self.format.as_deref() == Some("qcow2")
    }
}

/// What the domain XML tells about the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainDesc {
    pub name: String,
    pub uuid: String,
    /// Nova's `<nova:owner><nova:project uuid>`, when Nova defined the domain.
    pub project: Option<String>,
    /// Our record on a staging copy (restore into a new domain): whose copy it is.
    pub staging: Option<StagingMeta>,
    pub disks: Vec<DomainDisk>,
}

/// Namespace of our staging record in a domain's `<metadata>`.
/// Do not change: staging copies on every host carry it.
pub const STAGING_NS: &str = "https://cbt.invalid/staging/1";
/// Longest tenant, source UUID or backup id in a staging record.
pub const MAX_STAGING_FIELD: usize = 256;

/// What a staging copy records about itself, in its `<metadata>` as
/// `<cbt:staging xmlns:cbt="https://cbt.invalid/staging/1" tenant="…" source="…" backup="…"/>`:
/// the tenant it was made for (who owns it, whatever its name or the original's owner), the
/// UUID of the instance it was restored from and the backup id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StagingMeta {
    pub tenant: String,
    pub source: String,
    pub backup: String,
}

impl StagingMeta {
    /// The `<cbt:staging/>` element (for a domain's `<metadata>`).
    pub fn to_xml(&self) -> String {
        format!(
            "<cbt:staging xmlns:cbt=\"{STAGING_NS}\" tenant=\"{}\" source=\"{}\" backup=\"{}\"/>",
            esc(&self.tenant),
            esc(&self.source),
            esc(&self.backup)
        )
    }
}

/// The staging record under `<metadata>` (our namespace only; the prefix does not matter).
fn staging(root: Node<'_, '_>, what: &'static str) -> Result<Option<StagingMeta>, XmlError> {
    let Some(m) = child(root, "metadata") else {
        return Ok(None);
    };
    let mut found = m
        .children()
        .filter(|n| n.is_element() && n.tag_name().namespace() == Some(STAGING_NS));
    let Some(n) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() || n.tag_name().name() != "staging" {
        return Err(XmlError::Invalid {
            what,
            field: "staging record",
        });
    }
    let field = |name: &'static str| -> Result<String, XmlError> {
        match n.attribute(name) {
            Some(v) if !v.is_empty() && v.len() <= MAX_STAGING_FIELD => Ok(v.to_string()),
            Some(_) => Err(XmlError::Invalid { what, field: name }),
            None => Err(XmlError::Missing {
                what,
                missing: "an attribute of the staging record",
            }),
        }
    };
    Ok(Some(StagingMeta {
        tenant: field("tenant")?,
        source: field("source")?,
        backup: field("backup")?,
    }))
}

/// The staging record of a domain XML, if it carries one (see [`StagingMeta`]).
pub fn staging_meta(xml: &str) -> Result<Option<StagingMeta>, XmlError> {
    const W: &str = "domain";
    let doc = parse(W, xml)?;
    staging(doc.root_element(), W)
}

/// Parses a domain XML (`virDomainGetXMLDesc`).
pub fn domain(xml: &str) -> Result<DomainDesc, XmlError> {
    const W: &str = "domain";
    let doc = parse(W, xml)?;
    let root = doc.root_element();
    let name = text(child(root, "name")).ok_or(XmlError::Missing {
        what: W,
        missing: "<name>",
    })?;
    let uuid = text(child(root, "uuid")).unwrap_or_default();
    let staging = staging(root, W)?;
    let project = root
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "project")
        .and_then(|n| n.attribute("uuid"))
        .map(String::from);
    let mut disks = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for d in children(devices, "disk") {
            if d.attribute("device").unwrap_or("disk") != "disk" {
                continue; // cdrom, floppy, lun: not backed up
            }
            let Some(target) = child(d, "target").and_then(|t| t.attribute("dev")) else {
                return Err(XmlError::Missing {
                    what: W,
                    missing: "<disk><target dev>",
                });
            };
            let src = child(d, "source");
            let attr = |a: &str| src.and_then(|s| s.attribute(a)).unwrap_or("").to_string();
            let kind = d.attribute("type").unwrap_or("file");
            let source = match kind {
                "file" => DiskSource::File { path: attr("file") },
                "block" => DiskSource::Block { path: attr("dev") },
                "network" => DiskSource::Network {
                    protocol: attr("protocol"),
                    name: attr("name"),
                },
                "volume" => DiskSource::Volume {
                    pool: attr("pool"),
                    volume: attr("volume"),
                },
                other => DiskSource::Other { kind: other.into() },
            };
            disks.push(DomainDisk {
                target: target.to_string(),
                format: child(d, "driver")
                    .and_then(|x| x.attribute("type"))
                    .map(String::from),
                source,
                readonly: child(d, "readonly").is_some(),
            });
        }
    }
    Ok(DomainDesc {
        name,
        uuid,
        project,
        staging,
        disks,
    })
}

/// One disk of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointDisk {
    pub name: String,
    /// The bitmap, when `checkpoint='bitmap'`.
    pub bitmap: Option<String>,
}

/// A checkpoint as libvirt describes it (`VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointDesc {
    pub name: String,
    pub parent: Option<String>,
    pub creation_time: Option<u64>,
    pub disks: Vec<CheckpointDisk>,
}

impl CheckpointDesc {
    /// The bitmap this checkpoint keeps for disk `target`, if any.
    pub fn bitmap_for(&self, target: &str) -> Option<&str> {
        self.disks
            .iter()
            .find(|d| d.name == target)
            .and_then(|d| d.bitmap.as_deref())
    }
}

/// Parses a checkpoint XML.
pub fn checkpoint(xml: &str) -> Result<CheckpointDesc, XmlError> {
    const W: &str = "checkpoint";
    let doc = parse(W, xml)?;
    let root = doc.root_element();
    let name = text(child(root, "name")).ok_or(XmlError::Missing {
        what: W,
        missing: "<name>",
    })?;
    let parent = child(root, "parent").and_then(|p| text(child(p, "name")));
    let creation_time = text(child(root, "creationTime")).and_then(|t| t.parse().ok());
    let mut disks = Vec::new();
    if let Some(ds) = child(root, "disks") {
        for d in children(ds, "disk") {
            let Some(n) = d.attribute("name") else {
                continue;
            };
            let bitmap = (d.attribute("checkpoint") == Some("bitmap"))
                .then(|| d.attribute("bitmap").unwrap_or(&name).to_string());
            disks.push(CheckpointDisk {
                name: n.into(),
                bitmap,
            });
        }
    }
    Ok(CheckpointDesc {
        name,
        parent,
        creation_time,
        disks,
    })
}

/// One exported disk of a running pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupExport {
    pub disk: String,
    pub export: String,
    /// The dirty-bitmap meta context is `qemu:dirty-bitmap:<bitmap>` (incremental only).
    pub bitmap: Option<String>,
}

/// Parses the XML of a running backup job (`virDomainBackupGetXMLDesc`).
pub fn backup_exports(xml: &str) -> Result<Vec<BackupExport>, XmlError> {
    const W: &str = "backup job";
    let doc = parse(W, xml)?;
    let root = doc.root_element();
    let mut out = Vec::new();
    if let Some(ds) = child(root, "disks") {
        for d in children(ds, "disk") {
            if d.attribute("backup") != Some("yes") {
                continue;
            }
            let Some(n) = d.attribute("name") else {
                continue;
            };
            out.push(BackupExport {
                disk: n.into(),
                export: d.attribute("exportname").unwrap_or(n).into(),
                bitmap: d.attribute("exportbitmap").map(String::from),
            });
        }
    }
    Ok(out)
}

/// The Unix socket a running pull-mode backup job exports on.
pub fn backup_socket(xml: &str) -> Result<Option<String>, XmlError> {
    let doc = parse("backup job", xml)?;
    Ok(child(doc.root_element(), "server")
        .and_then(|s| s.attribute("socket"))
        .map(String::from))
}

/// Escapes text for an XML attribute or element.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// A checkpoint to create (or to redefine, with `creation_time`): a bitmap for each of
/// `tracked`, none for `untracked`.
pub fn checkpoint_xml(
    name: &str,
    creation_time: Option<u64>,
    tracked: &[&str],
    untracked: &[&str],
) -> String {
    let mut x = format!(
        "<domaincheckpoint><name>{}</name><description>cbt</description>",
        esc(name)
    );
    if let Some(t) = creation_time {
        x += &format!("<creationTime>{t}</creationTime>");
    }
    x += "<disks>";
    for d in tracked {
        x += &format!(
            "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
            esc(d),
            esc(name)
        );
    }
    for d in untracked {
        x += &format!("<disk name='{}' checkpoint='no'/>", esc(d));
    }
    x + "</disks></domaincheckpoint>"
}

/// One disk of a pull-mode backup to begin.
#[derive(Debug, Clone)]
pub struct BackupDiskReq<'a> {
    pub target: &'a str,
    /// The checkpoint to take the increment from; `None` for a full.
    pub incremental: Option<&'a str>,
    pub scratch: &'a str,
}

/// A pull-mode backup exporting `disks` on the Unix socket `socket`; disks not listed are
/// left out (`backup='no'`).
pub fn backup_xml(socket: &str, disks: &[BackupDiskReq<'_>], skipped: &[&str]) -> String {
    let mut x = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>",
        esc(socket)
    );
    for d in disks {
        let mode = match d.incremental {
            Some(c) => format!("backupmode='incremental' incremental='{}'", esc(c)),
            None => "backupmode='full'".to_string(),
        };
        x += &format!(
            "<disk name='{}' backup='yes' type='file' {mode}><scratch file='{}'/></disk>",
            esc(d.target),
            esc(d.scratch)
        );
    }
    for s in skipped {
        x += &format!("<disk name='{}' backup='no'/>", esc(s));
    }
    x + "</disks></domainbackup>"
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='kvm' id='3' xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
  <name>instance-0001</name><uuid>d164e3bc-ac33-4206-b894-dba491c0a8a4</uuid>
  <metadata><nova:instance><nova:owner><nova:user uuid="u1">x</nova:user>
    <nova:project uuid="p-42">demo</nova:project></nova:owner></nova:instance></metadata>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/a.qcow2' index='2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/b'/><target dev='vdb' bus='virtio'/><readonly/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='vms/c'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
  </devices></domain>"#;

    #[test]
    fn domain_disks_and_project() {
        let d = domain(DOMAIN).expect("parses");
        assert_eq!(d.name, "instance-0001");
        assert_eq!(d.project.as_deref(), Some("p-42"));
        let t: Vec<_> = d.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(t, ["vda", "vdb", "vdc"]);
        assert!(d.disks[0].trackable() && !d.disks[1].trackable());
        assert_eq!(d.disks[0].source.path(), Some("/var/lib/nova/a.qcow2"));
        assert!(d.disks[1].readonly);
        assert_eq!(
            d.disks[2].source,
            DiskSource::Network {
                protocol: "rbd".into(),
                name: "vms/c".into()
            }
        );
    }

    #[test]
    fn staging_record_round_trip() {
        let m = StagingMeta {
            tenant: "p-a\"<&'".into(),
            source: "d164e3bc-ac33-4206-b894-dba491c0a8a4".into(),
            backup: "b-1".into(),
        };
        let x = format!(
            "<domain><name>copy</name><metadata>{}<x:other xmlns:x='urn:x' tenant='evil'/></metadata></domain>",
            m.to_xml()
        );
        assert_eq!(staging_meta(&x).expect("parses"), Some(m.clone()));
        assert_eq!(domain(&x).expect("parses").staging, Some(m));
        // Another prefix for our namespace is still ours (libvirt may rewrite prefixes).
        let other = format!(
            "<domain><name>c</name><metadata><s:staging xmlns:s='{STAGING_NS}' tenant='t' source='s' backup='b'/></metadata></domain>"
        );
        assert_eq!(
            staging_meta(&other).expect("parses").map(|m| m.tenant),
            Some("t".into())
        );
        // An element of that name in another namespace is not ours.
        let foreign = "<domain><name>c</name><metadata><s:staging xmlns:s='urn:other' tenant='t' source='s' backup='b'/></metadata></domain>";
        assert_eq!(staging_meta(foreign).expect("parses"), None);
        assert_eq!(staging_meta(DOMAIN).expect("parses"), None);
    }

    #[test]
    fn a_malformed_staging_record_is_an_error() {
        let with = |el: &str| format!("<domain><name>c</name><metadata>{el}</metadata></domain>");
        let ns = format!("xmlns:cbt='{STAGING_NS}'");
        let long = "x".repeat(MAX_STAGING_FIELD + 1);
        for el in [
            format!("<cbt:staging {ns} tenant='t' source='s'/>"),
            format!("<cbt:staging {ns} tenant='' source='s' backup='b'/>"),
            format!("<cbt:staging {ns} tenant='{long}' source='s' backup='b'/>"),
            format!("<cbt:other {ns} tenant='t' source='s' backup='b'/>"),
            format!(
                "<cbt:staging {ns} tenant='t' source='s' backup='b'/><cbt:staging {ns} tenant='u' source='s' backup='b'/>"
            ),
        ] {
            assert!(staging_meta(&with(&el)).is_err(), "{el}");
            assert!(domain(&with(&el)).is_err(), "{el}");
        }
    }

    #[test]
    fn bad_xml_is_an_error() {
        assert!(domain("<domain><devices>").is_err());
        assert!(domain("<domain/>").is_err());
        assert!(checkpoint("not xml").is_err());
        let big = "x".repeat(MAX_XML + 1);
        assert!(matches!(domain(&big), Err(XmlError::TooLarge { .. })));
        let no_target = "<domain><name>a</name><devices><disk device='disk'/></devices></domain>";
        assert!(matches!(domain(no_target), Err(XmlError::Missing { .. })));
    }

    #[test]
    fn checkpoint_round_trip() {
        let x = checkpoint_xml("cbt-7", Some(1700), &["vda"], &["vdb"]);
        let c = checkpoint(&x).expect("parses");
        assert_eq!(c.name, "cbt-7");
        assert_eq!(c.creation_time, Some(1700));
        assert_eq!(c.bitmap_for("vda"), Some("cbt-7"));
        assert_eq!(c.bitmap_for("vdb"), None);
        let with_parent = "<domaincheckpoint><name>b</name><parent><name>a</name></parent>\
            <disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>";
        let c = checkpoint(with_parent).expect("parses");
        assert_eq!(c.parent.as_deref(), Some("a"));
        assert_eq!(c.bitmap_for("vda"), Some("b"));
    }

    #[test]
    fn backup_job_exports() {
        let x = "<domainbackup mode='pull'><disks>\
            <disk name='vda' backup='yes' exportname='vda' exportbitmap='backup-vda'/>\
            <disk name='vdb' backup='yes' exportname='vdb'/><disk name='vdc' backup='no'/>\
            </disks></domainbackup>";
        let e = backup_exports(x).expect("parses");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].bitmap.as_deref(), Some("backup-vda"));
        assert_eq!(e[1].bitmap, None);
    }

    #[test]
    fn escaping() {
        let x = backup_xml(
            "/tmp/a'b&c/s",
            &[BackupDiskReq {
                target: "vda",
                incremental: None,
                scratch: "/x<y",
            }],
            &["vdb"],
        );
        let d = Document::parse(&x).expect("well-formed");
        let s = d
            .descendants()
            .find(|n| n.has_tag_name("server"))
            .and_then(|n| n.attribute("socket"));
        assert_eq!(s, Some("/tmp/a'b&c/s"));
    }
}
