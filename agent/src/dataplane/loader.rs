//! Loading the programs once per agent start, and the pins: opened and re-adopted
//! under one bpffs dir, refused when of another layout, orphans removed.

use super::*;

pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis-tc"));

/// The object's program for each hook, in HOOK_* order.
pub(super) const PROGRAMS: [&str; HOOKS as usize] =
    ["trellis_ingress", "trellis_egress", "trellis_peer"];

/// Checks that `dir` is, or would be created, on a bpffs.
pub fn check_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.exists() {
            let on_bpffs = nix::sys::statfs::statfs(d)
                .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
            if on_bpffs {
                return Ok(());
            }
            return Err(DataplaneError::NoBpffs {
                dir: dir.display().to_string(),
            });
        }
        p = d.parent();
    }
    Err(DataplaneError::NoBpffs {
        dir: dir.display().to_string(),
    })
}

/// Loads (verifies) the TC classifier `name` of an object.
pub fn load_classifier(bpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
    classifier(bpf, name)?
        .load()
        .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))
}

pub(super) fn classifier<'a>(
    bpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    bpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))
}

/// Whether the pinned owner map in `dir` is empty (or absent).
pub(super) fn no_owners(dir: &Path) -> bool {
    let Ok(m) = MapData::from_pin(dir.join(maps::META)) else {
        return true;
    };
    BpfHashMap::<MapData, u32, SlotMeta>::try_from(aya::maps::Map::HashMap(m))
        .map(|m| m.keys().next().is_none())
        .unwrap_or(false)
}

/// Refuses pins of another layout in `dir` (their sizes and shapes differ from what
/// the programs expect): by the version they carry, then each pin's shape against
/// `MAPS` (a build that changed a map and forgot the version). A dir without pins is
/// fine.
pub(super) fn check_layout(dir: &Path) -> Result<(), DataplaneError> {
    if !pinned_maps().any(|m| dir.join(m).exists()) {
        return Ok(());
    }
    let layout_err = |found: String| DataplaneError::Layout {
        dir: dir.display().to_string(),
        found,
    };
    let found = match MapData::from_pin(dir.join(maps::LAYOUT)) {
        Err(_) => "1 (no LAYOUT pin)".to_string(),
        Ok(m) => {
            let layout: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(m))
                .map_err(|e| op("LAYOUT map")(e.to_string()))?;
            match layout.get(&0, 0) {
                Ok(v) if v == LAYOUT_VERSION => String::new(),
                // Pinned by a start that died before writing its version (older
                // agents wrote it last): ours if nothing was ever attached.
                Ok(0) if no_owners(dir) => String::new(),
                Ok(v) => v.to_string(),
                Err(e) => format!("unreadable ({e})"),
            }
        }
    };
    if !found.is_empty() {
        return Err(layout_err(found));
    }
    // The version is this agent's: now the shapes.
    for spec in MAPS.iter().filter(|m| m.pinned) {
        let path = dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|e| op(format!("reading pin {}", path.display()))(e.to_string()))?;
        let kind = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let shape = (
            kind,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let want = (
            spec.kind as u32,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
        );
        if shape != want {
            return Err(layout_err(format!(
                "{LAYOUT_VERSION} by their LAYOUT map, but map {} is of another shape (type, key, value, entries, flags: pinned {shape:?}, this agent's {want:?}: a build that changed the map without a new layout version)",
                spec.name
            )));
        }
    }
    Ok(())
}

impl Dataplane {
    /// Loads the programs, re-adopting maps already pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Dataplane, DataplaneError> {
        check_bpffs(dir)?;
        check_layout(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| op(format!("creating {}", dir.display()))(e.to_string()))?;
        // The programs use no CO-RE relocations: no need for the kernel's BTF, which
        // aya would parse into ~20 MB of the agent's heap.
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .default_map_pin_directory(dir)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        for name in pinned_maps() {
            if bpf.map(name).is_none() {
                return Err(DataplaneError::Load(format!(
                    "the object has no map {name}"
                )));
            }
        }
        // The maps are pinned now: say which layout they are before anything can fail.
        let mut layout: Array<&mut MapData, u32> =
            Array::try_from(bpf.map_mut(maps::LAYOUT).expect("checked"))
                .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        let mut progs = Vec::new();
        for name in PROGRAMS {
            load_classifier(&mut bpf, name)?;
            let fd = classifier(&mut bpf, name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(Into::into))
                .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))?;
            progs.push(fd);
        }
        let own_netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| op("opening the agent's netns")(e.to_string()))?;
        let mut dp = Dataplane {
            iv4: Mapped::new(&bpf, maps::ACL_IV4, ACL_SPACE)?,
            iv6: Mapped::new(&bpf, maps::ACL_IV6, ACL_SPACE)?,
            idx: Mapped::new(&bpf, maps::ACL_IDX, IDX_SPACE)?,
            rules: Mapped::new(&bpf, maps::ACL_RULES, RULE_SPACE)?,
            hits: Mapped::new(&bpf, maps::RULE_HITS, HIT_SPACE)?,
            freed_at: None,
            shaper: None,
            no_ifb: false,
            ingress_limit: Default::default(),
            acl_share: 1.0,
            progs,
            probe_ready: false,
            slots: BTreeMap::new(),
            next_slot: 0,
            host: None,
            pod_ns: None,
            own_netns,
            bpf,
            dir: dir.to_path_buf(),
        };
        let mut slots = BTreeMap::new();
        for e in dp.meta()?.iter() {
            let (slot, m) = e.map_err(|e| op("META map")(e.to_string()))?;
            slots.insert(slot, m);
        }
        dp.next_slot = slots.keys().next_back().map_or(0, |s| (s + 1) % MAX_SLOTS);
        dp.slots = slots;
        Ok(dp)
    }

    /// Removes what older layouts pinned per link (`links/`; tc filters need none).
    pub fn remove_orphan_pins(&mut self) -> Result<Vec<String>, DataplaneError> {
        let dir = self.dir.join("links");
        let mut removed = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if std::fs::remove_file(e.path()).is_ok() {
                    removed.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(removed)
    }

    /// The kernel memory (memlock) each shared program holds, in HOOK_* order.
    pub fn program_memlock(&self) -> Result<Vec<u64>, DataplaneError> {
        self.progs
            .iter()
            .map(|p| {
                let fd = p.as_fd().as_raw_fd();
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("memlock:"))
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .ok_or_else(|| op("reading a program's fdinfo")("no memlock".into()))
            })
            .collect()
    }

    /// The kernel memory (memlock) the pinned maps hold, in all.
    pub fn map_memlock(&self) -> Result<u64, DataplaneError> {
        let mut total = 0;
        for name in pinned_maps() {
            let Some(m) = self.bpf.map(name) else {
                continue;
            };
            let fd = match m {
                aya::maps::Map::Array(d)
                | aya::maps::Map::HashMap(d)
                | aya::maps::Map::PerCpuArray(d) => d.fd().as_fd().as_raw_fd(),
                _ => continue,
            };
            total += std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("memlock:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::maps::PinningType;
    use trellis_ebpf_common::map_spec;

    /// The programs name their maps in `#[map(name = ...)]` and size them there; the
    /// agent reads and writes them by `MAPS`. Checked on the object it embeds.
    #[test]
    fn the_embedded_object_declares_exactly_the_maps_of_ebpf_common() {
        // Built with AYA_BUILD_SKIP=1 (the fuzz build): there is no object to compare.
        if OBJECT.is_empty() && option_env!("AYA_BUILD_SKIP") == Some("1") {
            return;
        }
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        for spec in MAPS.iter() {
            let m = obj
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("the object has no map {}", spec.name));
            let pinning = if spec.pinned {
                PinningType::ByName
            } else {
                PinningType::None
            };
            assert_eq!(
                (
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                    m.pinning()
                ),
                (
                    spec.kind as u32,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries,
                    spec.flags,
                    pinning
                ),
                "map {}: (type, key, value, entries, flags, pinning) of the object vs MAPS",
                spec.name
            );
        }
        for name in obj.maps.keys().filter(|n| !n.starts_with('.')) {
            assert!(
                map_spec(name).is_some(),
                "the object's map {name} is not in MAPS"
            );
        }
        for hook in PROGRAMS {
            assert!(obj.programs.contains_key(hook), "no program {hook}");
        }
    }
}
