//! The little the loader needs from the running kernel's BTF (`/sys/kernel/btf/vmlinux`): a
//! function's type id and where a field sits in a struct. aya-obj parses BTF but keeps struct
//! members private, so this reads the format itself (kernel `Documentation/bpf/btf.rst`).

use anyhow::{Context as _, Result, bail, ensure};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_TYPE_TAG: u32 = 18;

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_type: u32,
    /// Struct and union members: (name offset, type id, offset word).
    members: Vec<(u32, u32, u32)>,
}

pub struct Btf {
    /// Index = type id (0 is void).
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// A field's position: bits from the start of the outer struct, and its bitfield width (0: not
/// a bitfield).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub bit_offset: u32,
    pub bitfield_size: u32,
}

impl Btf {
    pub fn from_vmlinux() -> Result<Self> {
        let data = std::fs::read(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
        Self::parse(&data).with_context(|| format!("parsing {VMLINUX}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |o: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(o..o + 2).context("truncated")?.try_into()?,
            ))
        };
        let u32_at = |o: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(o..o + 4).context("truncated")?.try_into()?,
            ))
        };
        ensure!(u16_at(0)? == MAGIC, "not little-endian BTF");
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("string section out of bounds")?
            .to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_type: 0,
            members: Vec::new(),
        }];
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while o < end {
            let (name_off, info, size_type) = (u32_at(o)?, u32_at(o + 4)?, u32_at(o + 8)?);
            o += 12;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let mut members = Vec::new();
            o += match kind {
                // int, var, decl_tag: one word
                1 | 14 | 17 => 4,
                // array
                3 => 12,
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let at = o + m * 12;
                        members.push((u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?));
                    }
                    vlen * 12
                }
                // enum, func_proto
                6 | 13 => vlen * 8,
                // datasec, enum64
                15 | 19 => vlen * 12,
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag
                2 | 7..=12 | 16 | 18 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 != 0,
                size_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn find(&self, name: &str, kind: u32) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())
            .map(|id| id as u32)
    }

    /// The type id of function `name` (a kfunc, for a `BPF_PSEUDO_KFUNC_CALL`).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(name, KIND_FUNC)
    }

    /// Where `field` sits in `struct name`, looking through anonymous struct and union members
    /// (the kernel groups `sk_buff`'s fields that way).
    pub fn field(&self, name: &str, field: &str) -> Option<Field> {
        let id = self.find(name, KIND_STRUCT)?;
        self.field_in(id, field, 0, 0)
    }

    fn field_in(&self, id: u32, field: &str, base: u32, depth: u32) -> Option<Field> {
        let t = self.types.get(id as usize)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for &(name_off, ty, offset) in &t.members {
            let (bit_offset, bitfield_size) = if t.kind_flag {
                (offset & 0xff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            if name_off == 0 {
                if let Some(f) =
                    self.field_in(self.resolve(ty), field, base + bit_offset, depth + 1)
                {
                    return Some(f);
                }
            } else if self.name(name_off) == field.as_bytes() {
                return Some(Field {
                    bit_offset: base + bit_offset,
                    bitfield_size,
                });
            }
        }
        None
    }

    /// Through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_type;
                }
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's own BTF, where it has one (every kernel vipx's lab runs on does).
    #[test]
    fn finds_the_skb_checksum_state_and_the_kfunc_in_the_running_kernel() {
        let btf = Btf::from_vmlinux().expect("kernel BTF");
        let f = btf
            .field("sk_buff", "ip_summed")
            .expect("sk_buff.ip_summed");
        assert_eq!(f.bitfield_size, 2);
        let pkt_type = btf.field("sk_buff", "pkt_type").expect("sk_buff.pkt_type");
        assert_eq!(pkt_type.bitfield_size, 3);
        assert_eq!(f.bit_offset / 8, pkt_type.bit_offset / 8, "one byte");
        assert!(btf.func_id("bpf_cast_to_kern_ctx").is_some());
        assert!(btf.field("sk_buff", "no_such_field").is_none());
        assert!(btf.func_id("no_such_function_at_all").is_none());
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 24]).is_err());
        // The right magic, then a type section past the end.
        let mut h = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        h.extend_from_slice(&[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(&h).is_err());
    }
}
