//! criterion benchmarks of the JIT on design.md 4.1's workloads, for regression tracking:
//! `cargo bench -p attngen` (`attngen bench` gives the GFLOP/s and GB/s report).

use attngen::{Jit, Kernel, Tensor, Workload, harness};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn workloads(c: &mut Criterion) {
    let jit = Jit::new().expect("this CPU is supported");
    let mut group = c.benchmark_group("jit");
    group.sample_size(10);
    for workload in Workload::standard() {
        let spec = &workload.spec;
        let kernel = jit.compile(spec).expect("the standard workloads are valid");
        let tensors = harness::inputs(spec, workload.shape, 1, 1.0).expect("workload sizes fit");
        let inputs = harness::view(spec, &tensors);
        let mut out = vec![0.0; Tensor::Out.len(spec, workload.shape).expect("fits")];
        let throughput = if workload.is_decode() {
            Throughput::Bytes(workload.kv_bytes())
        } else {
            Throughput::Elements(workload.flops())
        };
        group.throughput(throughput);
        group.bench_function(&workload.id, |b| {
            b.iter(|| kernel.run(workload.shape, &inputs, &mut out, None).expect("checked shapes"))
        });
    }
    group.finish();
}

criterion_group!(benches, workloads);
criterion_main!(benches);
