#!/usr/bin/perl
# A URL source's exchange that is over before the call that starts it returns: the connect
# completes at once and the whole answer is there at the first read. No event says so
# afterwards: the feed must take it then, or the source never asks again. Made so here with
# nginx's poll event method (epoll's reads wait for a first readiness event) and a preloaded
# shim that makes connect() to the fake API server's port complete at once and recv() from
# it wait for the answer.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
$t->write_file('poll.conf', $t->expand("%%MODULES%%pid %%TESTDIR%%/poll.pid;\nevents { use poll; }\nstream { }\n"));
plan skip_all => "this nginx has no poll event method (the vendored build has it)"
    unless system("$t->{binary} -t -q -p $dir/ -c $dir/poll.conf -e $dir/poll.log >/dev/null 2>&1") == 0;
my $at_once = $t->shim('at-once', <<'C');
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>

/* Read when the shim loads: nginx's workers have another environment. */
static int the_port;
__attribute__((constructor)) static void init(void) {
    const char *p = getenv("EDGE_AT_ONCE_PORT");
    the_port = p ? atoi(p) : 0;
}

static int peer_port(int fd) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    if (getpeername(fd, (struct sockaddr *) &a, &len) != 0 || a.sin_family != AF_INET) return 0;
    return ntohs(a.sin_port);
}

/* A non-blocking connect to the port that completes before it returns. */
int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "connect");
    if (sa->sa_family != AF_INET || ntohs(((const struct sockaddr_in *) sa)->sin_port) != the_port)
        return real(fd, sa, len);
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    int rc = real(fd, sa, len);
    fcntl(fd, F_SETFL, flags);
    return rc;
}

/* A read from the port that finds the answer there. */
ssize_t recv(int fd, void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "recv");
    if (the_port && peer_port(fd) == the_port) {
        struct pollfd p = { fd, POLLIN, 0 };
        poll(&p, 1, 2000);
    }
    return real(fd, buf, n, flags);
}
C

my ($kube, $doc, $stream) = Edge::FakeKube::one_route_document($t);
$t->config($stream);
my $conf = $t->read_file('nginx.conf');
$conf =~ s/events \{/events { use poll;/ or die "no events block\n";
$t->write_file('nginx.conf', $conf);
{
    local $ENV{LD_PRELOAD} = $at_once;
    local $ENV{EDGE_AT_ONCE_PORT} = $kube->port;
    $t->run;
}
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, 'one.test') eq 'a' }, 'the first answer, taken although no event said so');
pass('an exchange over before its start returned is taken');
$doc->('two.test');
wait_for(sub { http_get($edge, 'two.test') eq 'a' }, 'the next poll');
pass('and the source is polled again');
cmp_ok(scalar @{$kube->requests}, '>=', 2, 'the API server saw the polls');
done_testing;
