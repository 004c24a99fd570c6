# erp-cloud — the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PGPORT_PRIVATE := $(or $(ERP_CLOUD_PGPORT),54329)
# DATABASE_URL from the environment wins; otherwise the private cluster (scripts/pg.sh).
DB_URL := $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:$(PGPORT_PRIVATE)/erp_cloud)
CLI := node dist/listener/cli.js

.PHONY: help deps build db db-stop migrate test demo bench clean schema browser

help:
	@echo "make demo     start a private PostgreSQL with pg_cron, migrate, run the simulator and the listener, push sample messages through"
	@echo "make test     run the test suite (installs what it needs)"
	@echo "make bench    run the benchmarks (BENCH_QUICK=1 for a short run)"
	@echo "make db / make db-stop   start / stop the private cluster"
	@echo "make migrate  apply migrations to DATABASE_URL or the private cluster"
	@echo "make schema   regenerate sql/schema/ (the current definition of each schema) from a freshly migrated scratch database"

node_modules/.installed: package.json package-lock.json
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a===20&&b<19)) { console.error("erp-cloud needs Node.js 20.19 or newer (found "+process.version+")"); process.exit(1) }'
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deps: node_modules/.installed

# dist/ is rebuilt from scratch: a source file moved or removed must not live on as a stale .js (it would be packed)
build: deps
	rm -rf dist
	npx tsc -p tsconfig.json

db:
	@bash scripts/pg.sh start

db-stop:
	@bash scripts/pg.sh stop

migrate: build db
	$(CLI) -c '$(DB_URL)' migrate

# Debian's chromium for the console's browser tests (installed with apt when missing and run as root)
browser:
	@bash scripts/setup-browser.sh

# the tests' own pg_cron database (test/helpers/cron.ts): no test touches erp_cloud
test: build browser
	@ERP_CLOUD_CRON_DB=erp_cloud_test_cron bash scripts/pg.sh start
	DATABASE_URL='$(DB_URL)' npx vitest run

demo: build db
	DATABASE_URL='$(DB_URL)' bash scripts/demo.sh

schema: build db
	DATABASE_URL='$(DB_URL)' bash scripts/dump-schema.sh

bench: build db
	DATABASE_URL='$(DB_URL)' node dist/bench/run.js

clean:
	rm -rf dist
