//! The group mapping: which query heads a work item's group holds, as the plan's `HeadMap` resolves it.

use super::*;

impl Translator<'_> {
    /// Explicit maps get a per-call stack table of each group's heads; named maps compute them.
    pub(super) fn emit_head_table(&mut self) -> Option<Value> {
        if self.plan.head_map != HeadMap::Table {
            return None;
        }
        let width = self.largest_group();
        let size = (self.plan.groups.len() * (width + 1) * 4) as u32;
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            size,
            2,
        ));
        let table = self.b.ins().stack_addr(types::I64, slot, 0);
        // Layout per group: its size, then its heads.
        for (g, heads) in self.plan.groups.iter().enumerate() {
            let base = (g * (width + 1) * 4) as i32;
            let count = self.b.ins().iconst(types::I32, heads.len() as i64);
            self.b.ins().store(mem(), count, table, base);
            for (slot, &h) in heads.iter().enumerate() {
                let head = self.b.ins().iconst(types::I32, h as i64);
                self.b.ins().store(mem(), head, table, base + 4 * (slot as i32 + 1));
            }
        }
        Some(table)
    }

    pub(super) fn largest_group(&self) -> usize {
        self.plan.groups.iter().map(Vec::len).max().unwrap_or(1)
    }

    /// The number of query heads in the work item's group.
    pub(super) fn group_size(&mut self) -> Value {
        match self.head_table {
            Some(table) => {
                let stride = (self.largest_group() + 1) * 4;
                let offset = self.mul_imm(self.group, stride);
                let at = self.add(table, offset);
                let count = self.b.ins().load(types::I32, mem(), at, 0);
                self.b.ins().sextend(types::I64, count)
            }
            None => self.int(self.plan.groups[0].len() as i64),
        }
    }

    /// The query head in slot `slot` of the work item's group.
    pub(super) fn head_of(&mut self, slot: Value) -> Value {
        match (self.plan.head_map, self.head_table) {
            (_, Some(table)) => {
                let width = self.largest_group() + 1;
                let row = self.mul_imm(self.group, width);
                let index = self.add(row, slot);
                let index = self.add_imm(index, 1);
                let at = self.float_addr(table, index); // i32 and f32 are both 4 bytes
                let head = self.b.ins().load(types::I32, mem(), at, 0);
                self.b.ins().sextend(types::I64, head)
            }
            (HeadMap::Interleaved { groups }, None) => {
                let base = self.mul_imm(slot, groups);
                self.add(base, self.group)
            }
            (HeadMap::Contiguous { size }, None) => {
                let base = self.mul_imm(self.group, size);
                self.add(base, slot)
            }
            (HeadMap::Table, None) => unreachable!("explicit maps always have a head table"),
        }
    }

    /// `body(slot, head)` for every head of the work item's group.
    pub(super) fn for_each_head(&mut self, body: impl Fn(&mut Self, Value, Value)) {
        let zero = self.int(0);
        let count = self.group_size();
        self.for_range(zero, count, 1, |t, slot| {
            let head = t.head_of(slot);
            body(t, slot, head);
        });
    }

    /// `body(slot, head, qi, row)` for every valid row of the work item.
    pub(super) fn for_each_row(&mut self, body: impl Fn(&mut Self, Value, Value, Value, Value)) {
        self.for_each_head(|t, slot, head| {
            let zero = t.int(0);
            let nq = t.nq;
            t.for_range(zero, nq, 1, |t, qi| {
                let slot_rows = t.mul(slot, nq);
                let row = t.add(slot_rows, qi);
                body(t, slot, head, qi, row);
            });
        });
    }
}
