"""What `layerline bench` runs: decode and serve benchmarks, their servers, reports and link delays."""
