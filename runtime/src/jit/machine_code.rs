//! Machine code for [`super::Jit::dump`]: a generated function's listing, as capstone or
//! Cranelift gives it.

use cranelift_codegen::Context;
use cranelift_codegen::isa::TargetIsa;

/// The function's machine code: disassembled by capstone with the `disasm` feature, else (or
/// where capstone has no decoder for the ISA) Cranelift's own listing of its instructions
/// after register allocation.
///
/// Cranelift puts a function's constants after its code, and capstone decodes whatever bytes
/// it is given, so its listing would end in the constants read as instructions: that part is
/// one line saying where the constants lie.
pub(super) fn disassemble(ctx: &Context, isa: &dyn TargetIsa) -> String {
    let Some(code) = ctx.compiled_code() else { return String::from("(no code)") };
    #[cfg(feature = "disasm")]
    if let Ok(capstone) = isa.to_capstone() {
        let listing = match code.disassemble(Some(&ctx.func.params), &capstone) {
            Ok(listing) => listing,
            Err(e) => return format!("(disassembly failed: {e})"),
        };
        // The blocks as Cranelift decodes them: each from its own start to the next one's.
        let bytes = code.code_buffer();
        let mut starts: Vec<usize> = code.bb_starts.iter().map(|&start| start as usize).collect();
        if starts.first() != Some(&0) {
            starts.insert(0, 0);
        }
        let ends = starts.iter().skip(1).copied().chain([bytes.len()]);
        let blocks: Vec<Vec<Decoded>> = starts
            .iter()
            .zip(ends)
            .map(|(&start, end)| {
                let Ok(insns) = capstone.disasm_all(&bytes[start..end], start as u64) else {
                    return Vec::new();
                };
                let decoded = insns.iter().map(|insn| Decoded {
                    offset: insn.address() as usize,
                    bytes: insn.bytes().to_vec(),
                    operands: insn.op_str().unwrap_or("").to_owned(),
                });
                decoded.collect()
            })
            .collect();
        return without_constants(&listing, &blocks, bytes.len());
    }
    #[cfg(not(feature = "disasm"))]
    let _ = isa;
    code.vcode.clone().unwrap_or_else(|| String::from("(no listing)"))
}

/// One instruction as capstone decoded it.
#[cfg(feature = "disasm")]
struct Decoded {
    /// Its first byte's offset in the function.
    offset: usize,
    /// Its encoding.
    bytes: Vec<u8>,
    /// Its operands as capstone prints them (AT&T syntax on x86-64).
    operands: String,
}

#[cfg(feature = "disasm")]
impl Decoded {
    /// The offset an x86-64 operand `disp(%rip)` names: the next instruction's plus `disp`.
    fn rip_target(&self) -> Option<usize> {
        let (before, _) = self.operands.split_once("(%rip)")?;
        let displacement = before.rsplit([' ', ',']).next().unwrap_or("");
        let (negative, magnitude) = match displacement.strip_prefix('-') {
            Some(magnitude) => (true, magnitude),
            None => (false, displacement),
        };
        let magnitude = match magnitude.strip_prefix("0x") {
            Some(hex) => usize::from_str_radix(hex, 16).ok()?,
            None if magnitude.is_empty() => 0,
            None => magnitude.parse().ok()?,
        };
        let next = self.offset + self.bytes.len();
        if negative { next.checked_sub(magnitude) } else { next.checked_add(magnitude) }
    }
}

/// `listing` (Cranelift's: a `blockN:` line per block, then one line per instruction) with its
/// last block cut where the code ends. The constants start at the lowest offset the code reads
/// RIP-relative, past the last block's start (so only on x86-64; elsewhere Cranelift builds
/// constants in registers or jumps over them); the code ends at the last instruction before
/// them that is not their alignment's zero bytes (which x86-64 decodes as `add %al, (%rax)`,
/// an instruction Cranelift does not emit).
#[cfg(feature = "disasm")]
fn without_constants(listing: &str, blocks: &[Vec<Decoded>], len: usize) -> String {
    let Some(last) = blocks.last().filter(|last| !last.is_empty()) else {
        return listing.to_owned();
    };
    let last_start = last[0].offset;
    let constants = blocks.iter().flatten().filter_map(Decoded::rip_target);
    let Some(constants) = constants.filter(|&target| target > last_start).min() else {
        return listing.to_owned();
    };
    let before = last.iter().take_while(|insn| insn.offset + insn.bytes.len() <= constants);
    let mut kept: Vec<&Decoded> = before.collect();
    while kept.last().is_some_and(|insn| insn.bytes.iter().all(|&b| b == 0)) {
        kept.pop();
    }
    let code_end = kept.last().map_or(last_start, |insn| insn.offset + insn.bytes.len());
    let header = listing.rfind("\nblock").map_or(0, |at| at + 1);
    if !listing[header..].starts_with("block") {
        return listing.to_owned();
    }
    let mut cut = listing[..header].to_owned();
    for line in listing[header..].lines().take(1 + kept.len()) {
        cut.push_str(line);
        cut.push('\n');
    }
    cut.push_str(&format!("  ; 0x{code_end:x}..0x{len:x}: constants, not code\n"));
    cut
}

#[cfg(all(test, feature = "disasm"))]
mod tests {
    use super::*;

    fn insn(offset: usize, bytes: &[u8], operands: &str) -> Decoded {
        Decoded { offset, bytes: bytes.to_vec(), operands: operands.to_owned() }
    }

    #[test]
    fn rip_operands_name_their_targets() {
        let at = |operands| insn(0x10, &[0x90; 8], operands).rip_target();
        assert_eq!(at("0x1186(%rip), %xmm2"), Some(0x18 + 0x1186));
        assert_eq!(at("%rdi, -0x8(%rip)"), Some(0x10));
        assert_eq!(at("(%rip), %xmm0"), Some(0x18));
        assert_eq!(at("$3, 16(%rip)"), Some(0x28));
        assert_eq!(at("0x10(%rax), %xmm0"), None);
        assert_eq!(at("-0x100(%rip), %xmm0"), None);
    }

    /// A last block of a load, a jump and two bytes of padding, then 16 bytes of constants:
    /// the listing keeps the two instructions and says where the constants lie.
    #[test]
    fn the_last_block_ends_where_the_code_does() {
        let blocks = vec![
            vec![insn(0, &[0x55], ""), insn(1, &[0xc3], "")],
            vec![
                insn(2, &[0xc5, 0xfa, 0x10, 0x05, 0x06, 0, 0, 0], "6(%rip), %xmm0"),
                insn(10, &[0xeb, 0xf4], "0"),
                insn(12, &[0, 0], "%al, (%rax)"),
                insn(14, &[0, 0], "%al, (%rax)"),
                insn(16, &[0x3f, 0x80], "junk"),
            ],
        ];
        let listing = "block0: ; offset 0x0\n  pushq %rbp\n  retq\nblock1: ; offset 0x2\n  \
                       vmovss 6(%rip), %xmm0\n  jmp 0\n  addb %al, (%rax)\n  addb %al, (%rax)\n  \
                       das\n";
        let cut = without_constants(listing, &blocks, 32);
        assert_eq!(
            cut,
            "block0: ; offset 0x0\n  pushq %rbp\n  retq\nblock1: ; offset 0x2\n  vmovss \
             6(%rip), %xmm0\n  jmp 0\n  ; 0xc..0x20: constants, not code\n"
        );
        // Without a RIP-relative read past the last block's start, the listing stays whole.
        let no_constants = [blocks[0].iter().map(|i| insn(i.offset, &i.bytes, "")).collect()];
        assert_eq!(without_constants(listing, &no_constants, 32), listing);
    }
}
