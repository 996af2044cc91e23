#!/usr/bin/perl
# Small changes are read in the event loop, refusals included: a file of a folder that names
# an upstream no file defines is refused and the folder merged again with its last good
# version, and the worker still starts no thread (a thread would make glibc's system calls and malloc dearer for every later
# connection, see docs/performance.md).

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
mkdir "$dir/routes.d";
chmod 0755, "$dir/routes.d";
$t->write_routes('routes.d/10-upstreams.json', '{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}');
$t->write_routes('routes.d/20-app.json', '{"routes": {"app.test": "a"}}');
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.d interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass nginx_edge; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->run;
my $edge = $t->port('edge');
is(http_get($edge, 'app.test'), 'a', 'routes from the folder');

# A route to an upstream no file defines: the file is refused when the folder is merged, and
# the table merged again with its last good version.
$t->write_routes('routes.d/20-app.json', '{"routes": {"app.test": "a", "bad.test": "nowhere"}}');
$t->wait_for_log(qr/20-app\.json: .*unknown upstream "nowhere"/);
is(http_get($edge, 'app.test'), 'a', 'the last good version keeps serving');
is(http_get($edge, 'bad.test'), '', 'the refused route is not served');
# A later good change is taken.
$t->write_routes('routes.d/20-app.json', '{"routes": {"app.test": "a", "new.test": "a"}}');
wait_for(sub { http_get($edge, 'new.test') eq 'a' }, 'the next good change');
pass('the next good change is taken');
my @lines = $t->read_file('error.log') =~ /in service; .*; threads started by this worker: (\d+)$/mg;
ok(@lines >= 2, scalar(@lines) . ' tables in service');
is_deeply([grep { $_ } @lines], [], 'no thread started for any of them');

done_testing;
