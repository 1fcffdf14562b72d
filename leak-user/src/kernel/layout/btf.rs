//! A small reader for the BPF Type Format, enough to find structs, members, enums, functions
//! and tracepoint prototypes in `/sys/kernel/btf/vmlinux` (or a `.BTF` blob taken from any
//! kernel image).

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF data: {0}")]
    Malformed(String),
    #[error("BTF type {0} is out of range")]
    BadTypeId(u32),
}

const MAGIC: u16 = 0xeb9f;

/// BTF type kinds (`BTF_KIND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Void,
            1 => Self::Int,
            2 => Self::Ptr,
            3 => Self::Array,
            4 => Self::Struct,
            5 => Self::Union,
            6 => Self::Enum,
            7 => Self::Fwd,
            8 => Self::Typedef,
            9 => Self::Volatile,
            10 => Self::Const,
            11 => Self::Restrict,
            12 => Self::Func,
            13 => Self::FuncProto,
            14 => Self::Var,
            15 => Self::Datasec,
            16 => Self::Float,
            17 => Self::DeclTag,
            18 => Self::TypeTag,
            19 => Self::Enum64,
            _ => return None,
        })
    }
}

/// A member of a struct or union. `bit_offset` is from the start of the containing type.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub type_id: u32,
    pub bit_offset: u32,
    pub bitfield_size: u32,
}

#[derive(Clone, Debug)]
pub struct Type {
    pub kind: Kind,
    pub name: String,
    /// Size in bytes for ints, structs, unions, enums; otherwise 0.
    pub size: u32,
    /// Referenced type for pointers, typedefs, modifiers, functions, variables.
    pub referenced: u32,
    pub members: Vec<Member>,
    /// Enumerators of an enum (name, value).
    pub enumerators: Vec<(String, i64)>,
    /// Parameter types of a function prototype.
    pub params: Vec<u32>,
    /// (element type, element count) of an array.
    pub array: Option<(u32, u32)>,
}

/// Parsed BTF: every type, indexed by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<String, Vec<u32>>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, BtfError> {
    data.get(at..at + 2)
        .map(|bytes| u16::from_le_bytes([bytes[0], bytes[1]]))
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|bytes| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

impl Btf {
    /// Parses little-endian BTF as the kernel exposes it.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::Malformed(
                "bad magic (big-endian or not BTF)".into(),
            ));
        }
        let header_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize, what: &str| {
            header_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| data.get(start..end))
                .ok_or_else(|| BtfError::Malformed(format!("{what} section out of bounds")))
        };
        let type_data = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;
        let name_at = |off: u32| -> Result<String, BtfError> {
            let tail = strings
                .get(off as usize..)
                .ok_or_else(|| BtfError::Malformed(format!("string offset {off} out of bounds")))?;
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
        };

        let mut types = vec![Type {
            kind: Kind::Void,
            name: String::new(),
            size: 0,
            referenced: 0,
            members: Vec::new(),
            enumerators: Vec::new(),
            params: Vec::new(),
            array: None,
        }];
        let mut at = 0usize;
        while at < type_data.len() {
            let name = name_at(u32_at(type_data, at)?)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let kind = Kind::from_raw((info >> 24) & 0x1f).ok_or_else(|| {
                BtfError::Malformed(format!("unknown kind in type {}", types.len()))
            })?;
            let mut ty = Type {
                kind,
                name,
                size: 0,
                referenced: 0,
                members: Vec::new(),
                enumerators: Vec::new(),
                params: Vec::new(),
                array: None,
            };
            match kind {
                Kind::Int => {
                    ty.size = size_or_type;
                    at += 4;
                }
                Kind::Float => ty.size = size_or_type,
                Kind::Ptr
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::TypeTag
                | Kind::Func => ty.referenced = size_or_type,
                Kind::Fwd | Kind::Void => {}
                Kind::Array => {
                    ty.array = Some((u32_at(type_data, at)?, u32_at(type_data, at + 8)?));
                    at += 12;
                }
                Kind::Struct | Kind::Union => {
                    ty.size = size_or_type;
                    for _ in 0..vlen {
                        let raw_offset = u32_at(type_data, at + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (raw_offset & 0xff_ffff, raw_offset >> 24)
                        } else {
                            (raw_offset, 0)
                        };
                        ty.members.push(Member {
                            name: name_at(u32_at(type_data, at)?)?,
                            type_id: u32_at(type_data, at + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                        at += 12;
                    }
                }
                Kind::Enum => {
                    ty.size = size_or_type;
                    for _ in 0..vlen {
                        let value = u32_at(type_data, at + 4)?;
                        let value = if kind_flag {
                            value as i64
                        } else {
                            value as i32 as i64
                        };
                        ty.enumerators
                            .push((name_at(u32_at(type_data, at)?)?, value));
                        at += 8;
                    }
                }
                Kind::Enum64 => {
                    ty.size = size_or_type;
                    for _ in 0..vlen {
                        let low = u32_at(type_data, at + 4)? as u64;
                        let high = u32_at(type_data, at + 8)? as u64;
                        ty.enumerators.push((
                            name_at(u32_at(type_data, at)?)?,
                            ((high << 32) | low) as i64,
                        ));
                        at += 12;
                    }
                }
                Kind::FuncProto => {
                    ty.referenced = size_or_type;
                    for _ in 0..vlen {
                        ty.params.push(u32_at(type_data, at + 4)?);
                        at += 8;
                    }
                }
                Kind::Var => {
                    ty.referenced = size_or_type;
                    at += 4;
                }
                Kind::Datasec => {
                    ty.size = size_or_type;
                    at += 12 * vlen;
                }
                Kind::DeclTag => {
                    ty.referenced = size_or_type;
                    at += 4;
                }
            }
            types.push(ty);
        }
        if at != type_data.len() {
            return Err(BtfError::Malformed("type section ends mid-type".into()));
        }

        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, ty) in types.iter().enumerate() {
            if !ty.name.is_empty() {
                by_name.entry(ty.name.clone()).or_default().push(id as u32);
            }
        }
        Ok(Self { types, by_name })
    }

    pub fn get(&self, id: u32) -> Result<&Type, BtfError> {
        self.types.get(id as usize).ok_or(BtfError::BadTypeId(id))
    }

    /// The ids of every type called `name` with the given kind.
    pub fn find(&self, name: &str, kind: Kind) -> impl Iterator<Item = u32> + '_ {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |&id| self.types[id as usize].kind == kind)
    }

    /// Follows typedefs and qualifiers to the type they name.
    pub fn resolve(&self, mut id: u32) -> Result<(u32, &Type), BtfError> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match ty.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => {
                    id = ty.referenced
                }
                _ => return Ok((id, ty)),
            }
        }
        Err(BtfError::Malformed(format!("type chain too long at {id}")))
    }

    /// Size in bytes of a type, following typedefs, qualifiers and arrays.
    pub fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        let (_, ty) = self.resolve(id)?;
        Ok(match ty.kind {
            Kind::Ptr => 8,
            Kind::Array => {
                let (element, count) = ty.array.unwrap_or((0, 0));
                self.size_of(element)? * count as u64
            }
            _ => ty.size as u64,
        })
    }

    /// The value of an enumerator, searched in every enum (enumerator names are unique in C).
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.types
            .iter()
            .filter(|ty| matches!(ty.kind, Kind::Enum | Kind::Enum64))
            .flat_map(|ty| ty.enumerators.iter())
            .find(|(enumerator, _)| enumerator == name)
            .map(|&(_, value)| value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand: `struct point { int x; int y; }` and `int`.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0point\0x\0y\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for word in words {
                types.extend_from_slice(&word.to_le_bytes());
            }
        };
        // [1] int, 4 bytes, signed 32 bits
        push(&[1, 1 << 24, 4, (1 << 24) | 32]);
        // [2] struct point { int x; int y; }
        push(&[5, (4 << 24) | 2, 8, 11, 1, 0, 13, 1, 32]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn parses_hand_made_btf() {
        let btf = Btf::parse(&tiny_btf()).expect("parse");
        let id = btf.find("point", Kind::Struct).next().expect("point");
        let point = btf.get(id).expect("type");
        assert_eq!(point.size, 8);
        assert_eq!(point.members[1].name, "y");
        assert_eq!(point.members[1].bit_offset, 32);
        assert_eq!(btf.size_of(point.members[0].type_id).expect("size"), 4);
    }

    #[test]
    fn rejects_truncated_and_garbage_input() {
        let blob = tiny_btf();
        for len in 0..blob.len() {
            assert!(
                Btf::parse(&blob[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        assert!(Btf::parse(b"definitely not btf data").is_err());
    }
}
