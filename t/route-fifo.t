#!/usr/bin/perl
# A FIFO put in a route file's place: the worker never waits on it (nothing would ever write
# it), says what is wrong once, and the last good table keeps serving; a file put back is read.

use strict;
use warnings;
use Test::More;
use POSIX qw(mkfifo);
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
my $table = sub { qq({"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}, "routes": {"$_[0]": "a"}}\n) };
$t->write_routes('routes.json', $table->('one.test'));
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass nginx_edge; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->run;
my $edge = $t->port('edge');
is(http_get($edge, 'one.test'), 'a', 'routes from the file');

# A FIFO is not a regular file: read on a thread, which refuses it without waiting.
mkfifo("$dir/fifo", 0644) or die "mkfifo: $!\n";
rename "$dir/fifo", "$dir/routes.json" or die "rename: $!\n";
$t->wait_for_log(qr/edge_routes: .*routes\.json: not a regular file/);
pass('the FIFO is refused: not a regular file');
# The worker answers at once, with the last good table, while nothing writes the FIFO.
is(http_get($edge, 'one.test'), 'a', 'the last good table keeps serving');
is(http_get($edge, 'one.test'), 'a', 'and again');

unlink "$dir/routes.json";
$t->write_routes('routes.json', $table->('two.test'));
wait_for(sub { http_get($edge, 'two.test') eq 'a' }, 'the file put back is read');
pass('a file put back in its place is read');

done_testing;
