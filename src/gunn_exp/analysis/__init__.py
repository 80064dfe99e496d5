"""Looking at models and runs: complexity, speed benchmarks, reports and plots."""
