#!/usr/bin/perl
# Route tables change without an nginx reload: atomic rename, ConfigMap-style symlink swap,
# folders of files; a bad table is rejected whole and the last good one keeps serving;
# nginx -t rejects a bad table with file:line:col.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
my $upstreams = <<'EOF';
  "upstreams": {
    "a": {"servers": ["127.0.0.1:%%PORT_a%%"]},
    "b": {"servers": ["127.0.0.1:%%PORT_b%%"]}
  }
EOF
sub table { my ($routes) = @_; "{\n$upstreams,\n  \"routes\": $routes\n}\n" }

$t->write_routes('routes.json', table('{"app.test": "a"}'));
mkdir "$dir/routes.d";
mkdir "$dir/k8s";
chmod 0755, "$dir/routes.d", "$dir/k8s";
$t->write_routes('routes.d/10-upstreams.json', "{\n$upstreams}");
$t->write_routes('routes.d/20-app.json', '{"routes": {"folder.test": "a"}}');
# A Kubernetes ConfigMap volume: routes.json -> ..data/routes.json, ..data -> ..v1
mkdir "$dir/k8s/..v1";
chmod 0755, "$dir/k8s/..v1";
$t->write_routes('k8s/..v1/routes.json', table('{"k8s.test": "a"}'));
symlink '..v1', "$dir/k8s/..data";
symlink '..data/routes.json', "$dir/k8s/routes.json";

$t->config(<<'EOF', workers => 2);
    server { listen 127.0.0.1:%%PORT_file%%; edge_routes %%TESTDIR%%/routes.json interval=100ms;
             edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_folder%%; edge_routes %%TESTDIR%%/routes.d interval=100ms;
             edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_k8s%%; edge_routes %%TESTDIR%%/k8s interval=100ms;
             edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "backend-a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "backend-b"; }
EOF
my ($ok, $out) = $t->test_config;
ok($ok, 'nginx -t accepts the tables') or diag($out);
$t->run;
my ($file, $folder, $k8s) = map { $t->port($_) } qw(file folder k8s);

# Polls until every worker serves the new table: several connections in a row must agree.
sub eventually_routes {
    my ($port, $host, $want, $name) = @_;
    my $streak = 0;
    eval {
        wait_for(sub {
            $streak = http_get($port, $host) eq $want ? $streak + 1 : 0;
            $streak >= 10;
        }, $name);
    };
    is($streak >= 10 ? $want : http_get($port, $host), $want, $name);
}

is(http_get($file, 'app.test'), 'backend-a', 'file source at start');
$t->write_routes('routes.json', table('{"app.test": "b", "new.test": "b"}'));
eventually_routes($file, 'app.test', 'backend-b', 'atomic rename seen without reload');
eventually_routes($file, 'new.test', 'backend-b', 'new route served');
# The table is built on a thread; the worker logs how long its event loop was busy with it.
$t->wait_for_log(qr/\[notice\] .*edge_routes: \Q$dir\E\/routes\.json: table 2 loaded, 2 routes from 1 file\(s\) in [\d.]+ ms/);
$t->wait_for_log(qr/\[notice\] .*edge_routes: \Q$dir\E\/routes\.json: table 2 in service; this worker's event loop spent [\d.]+ ms on it/);
pass('the load is logged with its build time and the event-loop time');

# A bad table: rejected whole, logged with file:line:col, the last good keeps serving.
$t->write_routes('routes.json', "{\n  \"routes\": {\n    \"app.test\": \"a\",\n  }\n}\n");
$t->wait_for_log(qr/edge_routes: \Q$dir\E\/routes\.json:4:3: trailing comma; rejected, the last good version keeps serving/);
is(http_get($file, 'app.test'), 'backend-b', 'last good table keeps serving after a syntax error');
$t->write_routes('routes.json', table('{"app.test": "nope"}'));
$t->wait_for_log(qr/routes\.json: routes\["app\.test"\]: unknown upstream "nope"; rejected/);
is(http_get($file, 'new.test'), 'backend-b', 'last good table keeps serving after a schema error');
my $rejections = sub { scalar(() = $t->read_file('error.log') =~ /unknown upstream "nope"/g) };
wait_for(sub { $rejections->() >= 1 }, 'the table rejected');
$t->write_routes('routes.json', table('{"app.test": "a"}'));
eventually_routes($file, 'app.test', 'backend-a', 'good table after bad ones');
is($rejections->(), 1, 'a rejected file is logged once per change: one worker reads the source for the edge');

# Folder: files merge in name order; a broken file keeps its last good version.
is(http_get($folder, 'folder.test'), 'backend-a', 'folder: route from another file\'s upstream');
$t->write_routes('routes.d/30-more.json', '{"routes": {"more.test": "b"}}');
eventually_routes($folder, 'more.test', 'backend-b', 'folder: new file seen');
$t->write_routes('routes.d/20-app.json', '{"routes": {"folder.test": "b"');
$t->write_routes('routes.d/30-more.json', '{"routes": {"more.test": "a"}}');
eventually_routes($folder, 'more.test', 'backend-a', 'folder: other files update');
like($t->read_file('error.log'), qr/20-app\.json:1:30: EOF while parsing/, 'folder: broken file named with position');
is(http_get($folder, 'folder.test'), 'backend-a', 'folder: broken file keeps its last good version');
unlink "$dir/routes.d/30-more.json";
eventually_routes($folder, 'more.test', '', 'folder: removing a file removes its routes');

# ConfigMap-style swap of the ..data symlink.
is(http_get($k8s, 'k8s.test'), 'backend-a', 'symlinked source at start');
mkdir "$dir/k8s/..v2";
chmod 0755, "$dir/k8s/..v2";
$t->write_routes('k8s/..v2/routes.json', table('{"k8s.test": "b"}'));
symlink '..v2', "$dir/k8s/..data_tmp";
rename "$dir/k8s/..data_tmp", "$dir/k8s/..data" or die;
eventually_routes($k8s, 'k8s.test', 'backend-b', 'symlink swap seen');

# A source that disappears: warning, last table kept.
rename "$dir/routes.json", "$dir/routes.json.away";
$t->wait_for_log(qr/\[warn\].*routes\.json: No such file or directory.*; the last good table keeps serving/);
is(http_get($file, 'app.test'), 'backend-a', 'missing source keeps its last table');
rename "$dir/routes.json.away", "$dir/routes.json";

# nginx -s reload re-reads the tables, where a broken file is a configuration error: the
# old workers keep serving.
$t->reload_fails_with(qr/\[emerg\].*20-app\.json:1:30: EOF while parsing/);
is(http_get($folder, 'folder.test'), 'backend-a', 'serving after a refused nginx -s reload');
$t->write_routes('routes.d/20-app.json', '{"routes": {"folder.test": "b"}}');
$t->reload;
is(http_get($file, 'app.test'), 'backend-a', 'serving after nginx -s reload');

# Configuration time: a bad table is a configuration error, with file:line:col.
$t->write_routes('routes.json', "{\"routes\": {\"x.test\": 1,}}");
($ok, $out) = $t->test_config;
ok(!$ok, 'nginx -t fails on a bad table');
like($out, qr/\[emerg\] .*edge_routes: \Q$dir\E\/routes\.json:1:25: .*\(edge_routes in \Q$dir\E\/nginx\.conf:\d+\)/,
    'nginx -t names file:line:col and the directive') or diag($out);

unlike($t->read_file('error.log'), qr/\[(alert|crit)\]/, 'no alerts in error.log');
done_testing;
